"""The tunnel's server side: accept one connection on 15008 and learn who it is and what it wants.

`accept_tunnel` wraps the accepted socket with the destination workload's server context
(client certificate required, chain checked against the bundle), maps the client certificate to
a SPIFFE id through the identity provider (revocation, trust domain) and reads the header. The
caller then authorizes, connects to the app and answers with `respond`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass

import trio

from nodeagent.identity.api import IdentityProvider, IdentityUnavailable, PeerRejected
from nodeagent.tunnel.errors import TunnelError
from nodeagent.tunnel.header import (
    NEED_DATA,
    HeaderError,
    HeaderParser,
    TunnelRequest,
    TunnelResponse,
    encode_response,
)
from nodeagent.tunnel.tls import TlsStream

ACCEPT_TIMEOUT = 10.0  # handshake + header: a silent client is dropped after this


@dataclass(slots=True)
class Accepted:
    stream: TlsStream
    peer_identity: str
    request: TunnelRequest
    early_data: bytes  # stream bytes that arrived together with the header
    resumed: bool
    # The client's certificate (DER), kept so an open tunnel can be checked again when the
    # revocation list changes.
    peer_certificate: bytes = b""


def detach(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under an accepted trio stream (the trio object gives it up)."""
    fd = stream.socket.detach()
    return socket.socket(fileno=fd)


async def accept_tunnel(
    raw: socket.socket,
    *,
    identities: IdentityProvider,
    identity: str,
    limit: float = ACCEPT_TIMEOUT,
) -> Accepted:
    """TunnelError on any failure; the socket is closed then."""
    peer = "?"
    try:
        peer = "{}:{}".format(*raw.getpeername())
        context = identities.server_context(identity)
    except (OSError, IdentityUnavailable) as exc:
        raw.close()
        await trio.lowlevel.checkpoint()
        raise TunnelError("no_identity", f"tunnel from {peer}: {exc}") from None
    stream = TlsStream.wrap(raw, context, server_side=True)
    try:
        with trio.move_on_after(limit) as scope:
            try:
                await stream.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                raise TunnelError("tls_failed", f"tunnel from {peer}: handshake: {exc}") from None
            try:
                cert = stream.peer_certificate()
                source = identities.peer_identity(cert)
            except (PeerRejected, ssl.SSLError) as exc:
                raise TunnelError("peer_rejected", f"tunnel from {peer}: {exc}") from None
            parser = HeaderParser("request")
            while True:
                try:
                    event = parser.next_event()
                except HeaderError as exc:
                    await _try_respond(stream, TunnelResponse(400, str(exc)))
                    raise TunnelError("bad_header", f"tunnel from {peer}: {exc}") from None
                if event is not NEED_DATA:
                    assert isinstance(event, TunnelRequest)
                    return Accepted(
                        stream, source, event, parser.trailing_data, stream.session_reused, cert
                    )
                try:
                    data = await stream.receive_some(16384)
                except trio.BrokenResourceError as exc:
                    raise TunnelError("tls_failed", f"tunnel from {peer}: {exc}") from None
                if not data:
                    raise TunnelError("bad_header", f"tunnel from {peer}: closed before header")
                try:
                    parser.receive_data(data)
                except HeaderError as exc:
                    await _try_respond(stream, TunnelResponse(400, str(exc)))
                    raise TunnelError("bad_header", f"tunnel from {peer}: {exc}") from None
        assert scope.cancelled_caught
        raise TunnelError("timeout", f"tunnel from {peer}: no header within {limit:g}s")
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise


async def respond(stream: TlsStream, response: TunnelResponse) -> None:
    await stream.send_all(encode_response(response))


async def _try_respond(stream: TlsStream, response: TunnelResponse) -> None:
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await respond(stream, response)
