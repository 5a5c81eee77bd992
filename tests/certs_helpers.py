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


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class DnsCa:
    """A CA that issues leaves for DNS names (gateway and origination tests): `issue(dir, cn,
    dns)` writes `dir/tls.crt` and `dir/tls.key` (a Kubernetes TLS Secret's file names) and
    returns the certificate; `write(path)` writes the CA certificate."""

    def __init__(self, name: str = "test-ca") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert(name, self.key, None)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem())
        return path

    def issue(self, d: Path, cn: str, dns: list[str] | None = None) -> x509.Certificate:
        d.mkdir(parents=True, exist_ok=True)
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
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        # The key first, then the certificate: a reader that sees the new certificate sees
        # its key too (a rotation in the order a Secret volume's atomic swap gives).
        (d / "tls.key.new").write_bytes(_pem_key(key))
        (d / "tls.crt.new").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "tls.key.new").rename(d / "tls.key")
        (d / "tls.crt.new").rename(d / "tls.crt")
        return cert
