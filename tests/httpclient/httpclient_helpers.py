"""Loopback servers for the client's tests: scripted answers over real TCP (and TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    """Serve `handler` per connection on 127.0.0.1; the port."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class H11Server:
    """Server side of one connection: read whole requests, answer with h11 events."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)

    async def request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None when the client closed."""
        req: h11.Request | None = None
        body = bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(1 << 16))
            elif isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                assert req is not None
                return req, bytes(body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None

    async def send(self, *events: h11.Event) -> None:
        for ev in events:
            data = self.conn.send(ev)
            if data:
                await self.stream.send_all(data)

    def next_cycle(self) -> None:
        self.conn.start_next_cycle()


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
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
    """A CA and two leaves it signed (`server`, `client`), as PEM files; their paths."""
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
