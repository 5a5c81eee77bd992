"""The tunnel's server side: accept one HBONE connection on 15008 and learn who it is.

`accept_hbone` wraps the accepted socket with the destination workload's server context (client
certificate required, chain checked against the bundle, ALPN `h2` only), maps the client
certificate to a SPIFFE id through the identity provider (revocation, trust domain) and returns
the (not yet running) `HboneConnection`. The caller runs it with a per-stream handler that
authorizes each CONNECT, connects to the app and answers with a status.
"""

from __future__ import annotations

import socket
import ssl

import trio

from nodeagent.identity.api import IdentityProvider, IdentityUnavailable, PeerRejected
from nodeagent.tunnel.client import not_after
from nodeagent.tunnel.errors import TunnelError
from nodeagent.tunnel.h2conn import PING_INTERVAL, PING_TIMEOUT, HboneConnection
from nodeagent.tunnel.hbone import ALPN
from nodeagent.tunnel.tls import TlsStream

ACCEPT_TIMEOUT = 10.0  # TLS handshake: a silent client is dropped after this


def detach(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under an accepted trio stream (the trio object gives it up)."""
    fd = stream.socket.detach()
    return socket.socket(fileno=fd)


async def accept_hbone(
    raw: socket.socket,
    *,
    identities: IdentityProvider,
    identity: str,
    limit: float = ACCEPT_TIMEOUT,
    ping_interval: float = PING_INTERVAL,
    ping_timeout: float = PING_TIMEOUT,
) -> tuple[HboneConnection, bool]:
    """The verified connection and whether its TLS session was resumed. TunnelError on any
    failure; the socket is closed then."""
    peer = "?"
    try:
        peer = "{}:{}".format(*raw.getpeername())
        context = identities.server_context(identity)
        context.set_alpn_protocols([ALPN])
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
        if scope.cancelled_caught:
            raise TunnelError("timeout", f"tunnel from {peer}: no handshake within {limit:g}s")
        if stream.ssl.selected_alpn_protocol() != ALPN:
            raise TunnelError("alpn", f"tunnel from {peer}: client did not offer ALPN {ALPN!r}")
        try:
            cert = stream.peer_certificate()
            source = identities.peer_identity(cert)
        except (PeerRejected, ssl.SSLError) as exc:
            raise TunnelError("peer_rejected", f"tunnel from {peer}: {exc}") from None
        conn = HboneConnection(
            stream,
            client=False,
            peer_identity=source,
            peer_certificate=cert,
            peer_not_after=not_after(cert),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        return conn, stream.session_reused
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
