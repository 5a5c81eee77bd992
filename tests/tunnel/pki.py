"""A throwaway CA and an in-process IdentityProvider for the tunnel tests.

Real X.509 (ECDSA P-256, SPIFFE URI SANs, TLS 1.3 contexts), no store and no CA process: the
identity manager is another package; this provider implements the same contract
(`nodeagent.identity.api.IdentityProvider`) so the data plane can be tested on its own.
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.identity.api import IdentityUnavailable, PeerRejected

TRUST_DOMAIN = "cluster.local"


def spiffe(namespace: str, sa: str, td: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{td}/ns/{namespace}/sa/{sa}"


class ThrowawayCA:
    """A self-signed root that issues SPIFFE leaf certificates."""

    def __init__(self, name: str = "test-root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, *uris: str, ttl: float = 3600.0
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=True,
            )
        return builder.sign(self.key, hashes.SHA256()), key


class LocalIdentityProvider:
    """IdentityProvider over a ThrowawayCA: `ensure` issues at once unless `hold` names the id."""

    def __init__(self, ca: ThrowawayCA, *, trust_domain: str = TRUST_DOMAIN) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        self.hold: set[str] = set()  # identities that never become ready
        self.ttl = 3600.0  # lifetime of the certificates `ensure` issues from now on
        self.revoked: set[int] = set()
        self.ensured: list[str] = []
        self.released: list[str] = []
        self._dir = tempfile.TemporaryDirectory(prefix="tunnel-pki-")
        self._files: dict[str, Path] = {}
        self._server: dict[str, ssl.SSLContext] = {}
        self._client: dict[str, ssl.SSLContext] = {}
        self.serials: dict[str, int] = {}
        self._ready: dict[str, trio.Event] = {}
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Like IdentityManager.wait_changed: returns at the next `revoke` (the CRL changed)."""
        await self._changed.wait()

    def revoke(self, identity: str) -> None:
        """Put `identity`'s certificate on the revocation list and tell `wait_changed` waiters."""
        self.revoked.add(self.serials[identity])
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def close(self) -> None:
        self._dir.cleanup()

    def ensure(self, identity: str) -> None:
        self.ensured.append(identity)
        if identity in self._files or identity in self.hold:
            return
        cert, key = self.ca.issue(identity, ttl=self.ttl)
        self.serials[identity] = cert.serial_number
        path = Path(self._dir.name) / f"{len(self.ensured)}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + cert.public_bytes(serialization.Encoding.PEM)
        )
        self._files[identity] = path
        self._ready.setdefault(identity, trio.Event()).set()

    def grant(self, identity: str) -> None:
        """Stop holding `identity` back: issue its certificate now."""
        self.hold.discard(identity)
        self.ensure(identity)

    def release(self, identity: str) -> None:
        self.released.append(identity)
        self._files.pop(identity, None)
        self._ready.pop(identity, None)
        self._server.pop(identity, None)
        self._client.pop(identity, None)

    async def wait_ready(self, identity: str, within: float) -> None:
        if identity in self._files:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(within):
            await self._ready.setdefault(identity, trio.Event()).wait()
            return
        raise IdentityUnavailable(f"no certificate for {identity} within {within:g}s")

    def _context(self, identity: str, side: ssl._SSLMethod) -> ssl.SSLContext:
        path = self._files.get(identity)
        if path is None:
            raise IdentityUnavailable(f"no certificate for {identity}")
        ctx = ssl.SSLContext(side)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(path)
        ctx.load_verify_locations(cadata=self.ca.pem.decode())
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self, identity: str) -> ssl.SSLContext:
        if identity not in self._server:
            self._server[identity] = self._context(identity, ssl.PROTOCOL_TLS_SERVER)
        return self._server[identity]

    def client_context(self, identity: str) -> ssl.SSLContext:
        if identity not in self._client:
            self._client[identity] = self._context(identity, ssl.PROTOCOL_TLS_CLIENT)
        return self._client[identity]

    def peer_identity(self, cert_der: bytes) -> str:
        cert = x509.load_der_x509_certificate(cert_der)
        if cert.serial_number in self.revoked:
            raise PeerRejected(f"certificate serial {cert.serial_number:x} is revoked")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            raise PeerRejected("peer certificate has no SAN") from None
        uris = [
            u
            for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"spiffe://{self.trust_domain}/")
        ]
        if len(uris) != 1:
            raise PeerRejected(f"peer certificate has {len(uris)} SPIFFE ids of our domain")
        return uris[0]
