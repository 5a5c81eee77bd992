"""A new connection on a TLS port: read its SNI, pick the server, terminate TLS.

The ClientHello is peeked (`MSG_PEEK`), never consumed, so the same bytes go to OpenSSL when
the server terminates, or to the destination when it passes through. The terminated stream is
the tunnel's `TlsStream` (OpenSSL on memory BIOs, large socket reads and writes). Every refusal
is a `TlsRefused` naming the reason; the caller writes the connection's one log line.
"""

from __future__ import annotations

import socket
import ssl

import trio

from nodeagent.gateway.clienthello import MAX_HELLO, ClientHello, parse_client_hello
from nodeagent.gateway.credentials import CredentialError, CredentialSource
from nodeagent.gateway.servers import ServerBinding
from nodeagent.tunnel import TlsStream, detach

HANDSHAKE_TIMEOUT = 10.0  # ClientHello and handshake together; a silent client is dropped
_PEEK_RETRY = 0.01  # a ClientHello split over segments: MSG_PEEK leaves the socket readable


class TlsRefused(Exception):
    """A TLS connection the gateway did not accept; `reason` is a short token for logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


async def peek_client_hello(sock: trio.socket.SocketType) -> ClientHello:
    """The connection's ClientHello, left in the socket."""
    seen = -1
    while True:
        data = await sock.recv(MAX_HELLO + 64, socket.MSG_PEEK)
        if not data:
            raise TlsRefused("no_client_hello", "closed before a ClientHello")
        hello = parse_client_hello(data)
        if hello is not None:
            return hello
        if len(data) == seen:
            await trio.sleep(_PEEK_RETRY)
        seen = len(data)


def _san_values(cert: dict[str, object]) -> set[str]:
    out = set()
    for entry in cert.get("subjectAltName", ()):  # type: ignore[attr-defined]
        if isinstance(entry, tuple) and len(entry) == 2:
            out.add(str(entry[1]))
    return out


async def terminate(
    stream: trio.SocketStream, binding: ServerBinding, credentials: CredentialSource
) -> TlsStream:
    """TLS with `binding`'s certificate over `stream` (which this takes over): the handshaken
    stream, or TlsRefused (the socket is closed then)."""
    assert binding.tls is not None
    tls = binding.tls
    try:
        context = credentials.context_for(tls)
    except CredentialError as exc:
        await stream.aclose()
        raise TlsRefused("no_credential", str(exc)) from None
    out = TlsStream.wrap(detach(stream), context, server_side=True)
    try:
        try:
            await out.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise TlsRefused("handshake_failed", str(reason)) from None
        if tls.mutual and tls.subject_alt_names:
            peer = out.ssl.getpeercert() or {}
            if not _san_values(dict(peer)) & set(tls.subject_alt_names):
                raise TlsRefused("san_mismatch", "client certificate SANs are not allowed")
    except BaseException:
        with trio.CancelScope(shield=True):
            await out.aclose()
        raise
    return out
