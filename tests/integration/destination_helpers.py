"""Helpers of the destination-side L7 sandbox tests (`test_destination_l7.py` for HTTP/1.1,
`test_destination_grpc.py` for gRPC): AuthorizationPolicy builders, a JWT issuer whose JWKS a
pod serves, the n2 agent's metrics and access-log lines, an app answering the XFCC it got."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from nodeagent.contract import METRICS_PATH, METRICS_PORT
from nodeagent.sandbox import Sandbox

ISSUER = "https://issuer.test"

# An app on 8080 (`python3 app.py`): answers "xfcc=<the x-forwarded-client-cert header, or ->
# path=<path>"; only the destination's HTTP view sets that header.
XFCC_APP = r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        xfcc = self.headers.get("x-forwarded-client-cert", "-")
        body = f"xfcc={xfcc} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def ap(name: str, ns: str, action: str, rules: list[Any], labels: dict[str, str]) -> Any:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"matchLabels": labels}, "action": action, "rules": rules},
    }


def op(**operation: Any) -> dict[str, Any]:
    return {"to": [{"operation": operation}]}


class Issuer:
    """A test issuer: RSA keys by kid, the JWKS file the jwks pod serves, signed tokens."""

    def __init__(self, jwks_file: Path) -> None:
        self.file = jwks_file
        self.keys: dict[str, rsa.RSAPrivateKey] = {}

    def new_key(self, kid: str) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def publish(self, **keys: rsa.RSAPrivateKey) -> None:
        """Serve exactly `keys` (kid → key) from now on (a rotation replaces the file)."""
        self.keys = dict(keys)
        jwks = []
        for kid, key in keys.items():
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwks.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": jwks}))
        tmp.replace(self.file)

    def token(
        self,
        kid: str,
        *,
        key: rsa.RSAPrivateKey | None = None,
        iss: str = ISSUER,
        aud: str = "api",
        sub: str = "alice",
        exp_in: float = 600,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + exp_in, **claims}
        signing = key if key is not None else self.keys[kid]
        return jwt.encode(payload, signing, algorithm="RS256", headers={"kid": kid})


def scrape(sb: Sandbox, node: str) -> str:
    url = f"http://{sb.node(node).underlay_ip}:{METRICS_PORT}{METRICS_PATH}"
    r = sb.exec("outside", ["curl", "-sf", "--max-time", "5", url], timeout=15)
    assert r.returncode == 0, r.stderr
    return str(r.stdout)


def access_lines(sb: Sandbox, node: str) -> list[dict[str, Any]]:
    out = []
    for line in sb.node(node).agent_log.read_text(errors="replace").splitlines():
        if '"access.request"' not in line:
            continue
        try:
            doc = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if doc.get("event") == "access.request":
            out.append(doc)
    return out
