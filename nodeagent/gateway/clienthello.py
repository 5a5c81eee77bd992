"""The server name (SNI) of a TLS ClientHello, read before anything answers it (sans-IO).

The gateway peeks at a new connection's first bytes to pick the Gateway server (and so the
certificate, or the passthrough destination) by SNI. `parse_client_hello(data)` reads what has
arrived so far: a `ClientHello`, None when more bytes are needed, or `ClientHelloError` for
bytes that are not a TLS ClientHello. Memory is bounded: a hello longer than `MAX_HELLO` bytes
is an error, never a larger buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO = 16 * 1024 + 5 * 4  # a few records' headers over one record's worth of hello
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_ALPN = 16


class ClientHelloError(ValueError):
    """The connection did not start with a well-formed TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # lower case, None when the client sent no SNI
    alpn: tuple[str, ...] = ()


def _handshake_bytes(data: bytes) -> bytes | None:
    """The handshake message bytes of the leading records (None: the message is incomplete)."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return None
        kind, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5])
        if kind != _HANDSHAKE or major != 3:
            raise ClientHelloError("not a TLS handshake record")
        if length == 0 or length > 16384 + 256:
            raise ClientHelloError(f"bad TLS record length {length}")
        if len(data) - pos - 5 < length:
            return None
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4:
            if out[0] != _CLIENT_HELLO:
                raise ClientHelloError("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(out[1:4])
            if need > MAX_HELLO:
                raise ClientHelloError(f"ClientHello of {need} bytes is over {MAX_HELLO}")
            if len(out) >= need:
                return bytes(out[4:need])


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ClientHelloError("truncated ClientHello")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n))

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))


def _server_name(ext: bytes) -> str | None:
    names = _Reader(_Reader(ext).vector(2))
    while names.pos < len(names.data):
        kind = names.number(1)
        name = names.vector(2)
        if kind == 0:
            try:
                return name.decode("ascii").lower().rstrip(".")
            except UnicodeDecodeError:
                raise ClientHelloError("server name is not ASCII") from None
    return None


def _alpn(ext: bytes) -> tuple[str, ...]:
    protocols = _Reader(_Reader(ext).vector(2))
    out = []
    while protocols.pos < len(protocols.data):
        out.append(protocols.vector(1).decode("ascii", "replace"))
    return tuple(out)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data`, None if it has not all arrived yet."""
    body = _handshake_bytes(data[: MAX_HELLO + 5 * 8])
    if body is None:
        if len(data) > MAX_HELLO + 5 * 8:
            raise ClientHelloError(f"no complete ClientHello in {len(data)} bytes")
        return None
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # compression_methods
    if r.pos == len(body):
        return ClientHello(server_name=None)
    extensions = _Reader(r.vector(2))
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    while extensions.pos < len(extensions.data):
        kind = extensions.number(2)
        ext = extensions.vector(2)
        if kind == _SERVER_NAME:
            server_name = _server_name(ext)
        elif kind == _ALPN:
            alpn = _alpn(ext)
    return ClientHello(server_name=server_name, alpn=alpn)
