"""A throwaway PKI written to files, for tests of TLS with client certificates.

`write_pki(dir)` makes a CA and two leaves it signed, `server` and `client`, as PEM files (ECDSA
P-256, one hour). Both leaves carry the 127.0.0.1 IP SAN and both TLS usages, so either can serve
or authenticate on loopback (etcd's --client-cert-auth, the HTTP client's tests). The SPIFFE
certificates of the mesh come from `tunnel/pki.py` instead (in memory, URI SANs).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    """Self-signed CA when `issuer` is None, else a loopback leaf signed by `issuer`."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(san, critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write_pki(d: Path) -> dict[str, str]:
    """Write the CA and the leaves under `d` (created if missing); their paths by name: `ca`,
    `server`, `server-key`, `client`, `client-key`."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None)
    out = {"ca": str(d / "ca.pem")}
    Path(out["ca"]).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for leaf in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(leaf, key, (ca.subject, ca_key))
        out[leaf] = str(d / f"{leaf}.pem")
        out[f"{leaf}-key"] = str(d / f"{leaf}-key.pem")
        Path(out[leaf]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        Path(out[f"{leaf}-key"]).write_bytes(key_bytes)
    return out
