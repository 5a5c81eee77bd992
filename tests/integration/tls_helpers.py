"""TLS pieces of the sandbox tests (test_gateway_tls.py, test_tls_origination.py): a Python
HTTPS server for pods and the outside host, and the certificate `openssl s_client` sees."""

from __future__ import annotations

from cryptography import x509

from nodeagent.sandbox import Sandbox

# `tls_server.py CERT_DIR PORT [CLIENT_CA]`: HTTPS with CERT_DIR/tls.crt and tls.key, answers
# "pod-tls PATH"; with CLIENT_CA, a client certificate of that CA is required.
TLS_SERVER = r"""
import ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"pod-tls {self.path}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1] + "/tls.crt", sys.argv[1] + "/tls.key")
if len(sys.argv) > 3:
    ctx.load_verify_locations(sys.argv[3])
    ctx.verify_mode = ssl.CERT_REQUIRED
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def served_certificate(
    sb: Sandbox, ip: str, sni: str, port: int = 443, where: str = "outside"
) -> x509.Certificate | None:
    """The certificate `openssl s_client -servername sni` sees (None: the handshake failed)."""
    r = sb.exec(
        where,
        ["openssl", "s_client", "-connect", f"{ip}:{port}", "-servername", sni],
        timeout=20,
        input="",
    )
    out = str(r.stdout)
    if "-----BEGIN CERTIFICATE-----" not in out:
        return None
    begin = out.index("-----BEGIN CERTIFICATE-----")
    end = out.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return x509.load_pem_x509_certificate(out[begin:end].encode())


def cn(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)
