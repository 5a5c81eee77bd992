"""A sandbox's own certificate authority for TLS at the edge (gateway certificates, servers
on the outside host), files only, ECDSA P-256.

`FileCa(dir)` creates `dir/ca.crt` and `dir/ca.key` once and reuses them; `issue(out, cn,
dns)` writes a leaf for those DNS names as a Kubernetes TLS Secret's files (`out/tls.crt`,
`out/tls.key`, plus `out/ca.crt`), the key first and each file renamed into place, so a
reader that sees the new certificate finds its key too. The CA key stays in `dir` (0600).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LIFETIME = datetime.timedelta(days=1)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.rename(path)


class FileCa:
    """A CA kept in `directory` (created on first use)."""

    def __init__(self, directory: Path, name: str = "sandbox-edge-ca") -> None:
        self.directory = directory
        self.cert_file = directory / "ca.crt"
        key_file = directory / "ca.key"
        if self.cert_file.is_file() and key_file.is_file():
            loaded = serialization.load_pem_private_key(key_file.read_bytes(), None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            self.key = loaded
            self.cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME * 7)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        _write(key_file, _key_pem(self.key), 0o600)
        _write(self.cert_file, self.pem())

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, out: Path, cn: str, dns: list[str] | None = None) -> x509.Certificate:
        """A leaf for `dns` (default: `cn`) in `out/` as tls.crt, tls.key and ca.crt."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in (dns or [cn])]
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        _write(out / "tls.key", _key_pem(key), 0o600)
        _write(out / "tls.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write(out / "ca.crt", self.pem())
        return cert
