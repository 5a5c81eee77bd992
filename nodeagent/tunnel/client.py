"""The tunnel's client side: open an HBONE connection (mTLS, ALPN h2) to a pod's port 15008.

`connect_hbone` makes one connection for the pool (`pool.py`). The socket is created in the
source pod's netns with the mesh mark (so the capture rules let it through), the client presents
the source workload's certificate, and the server must present exactly the SPIFFE id the
destination workload has: anything else is refused before one byte of the application's stream
is sent, and a pooled connection serves only that identity. TLS sessions are cached per (source
identity, destination address, destination identity) so a new connection resumes.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections import OrderedDict
from dataclasses import dataclass

import trio
from cryptography import x509

from nodeagent.contract import TUNNEL_PORT
from nodeagent.identity.api import IdentityProvider, PeerRejected
from nodeagent.inpod import Netns
from nodeagent.tunnel.credentials import TunnelCredentials
from nodeagent.tunnel.errors import TunnelError
from nodeagent.tunnel.h2conn import PING_INTERVAL, PING_TIMEOUT, HboneConnection
from nodeagent.tunnel.hbone import ALPN
from nodeagent.tunnel.tls import TlsStream

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


class SessionCache:
    """A bounded LRU of TLS sessions, each kept with the client context that made it (Python
    refuses a session from another context, e.g. after a certificate rotation)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str], tuple[ssl.SSLContext, ssl.SSLSession]] = (
            OrderedDict()
        )

    def get(self, key: tuple[str, str, str], context: ssl.SSLContext) -> ssl.SSLSession | None:
        item = self._items.get(key)
        if item is None or item[0] is not context:
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(
        self, key: tuple[str, str, str], context: ssl.SSLContext, session: ssl.SSLSession
    ) -> None:
        self._items[key] = (context, session)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def discard(self, key: tuple[str, str, str]) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class TunnelInfo:
    peer_identity: str
    resumed: bool  # the TLS handshake resumed a session
    handshake_ms: float
    reused: bool = False  # the stream went on a pooled connection (no handshake at all)


async def connect_socket(sock: socket.socket, address: tuple[str, int], limit: float) -> None:
    """Non-blocking connect with a deadline; errors name the address."""
    where = f"{address[0]}:{address[1]}"
    code = sock.connect_ex(address)
    if code in (errno.EINPROGRESS, errno.EALREADY):
        with trio.move_on_after(limit) as scope:
            await trio.lowlevel.wait_writable(sock)
        if scope.cancelled_caught:
            raise TunnelError("connect_timeout", f"connect {where}: timed out after {limit:g}s")
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    else:
        await trio.lowlevel.checkpoint()
    if code != 0:
        raise TunnelError("connect_failed", f"connect {where}: {os.strerror(code)}")


async def connect_hbone(
    *,
    netns: Netns,
    identities: IdentityProvider,
    source_identity: str,
    address: str,
    expected_identity: str,
    sessions: SessionCache | None = None,
    port: int = TUNNEL_PORT,
    connect_timeout: float = CONNECT_TIMEOUT,
    ping_interval: float = PING_INTERVAL,
    ping_timeout: float = PING_TIMEOUT,
) -> tuple[HboneConnection, TunnelInfo]:
    """Connect from `netns`, handshake (TLS 1.3, ALPN h2), verify the server is exactly
    `expected_identity`: the connection, not yet running. TunnelError (with a flag) on failure."""
    context = identities.client_context(source_identity)
    context.set_alpn_protocols([ALPN])
    key = (source_identity, address, expected_identity)
    session = sessions.get(key, context) if sessions is not None else None
    raw = netns.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream: TlsStream | None = None
    where = f"{address}:{port}"
    try:
        await connect_socket(raw, (address, port), connect_timeout)
        stream = TlsStream.wrap(raw, context, server_side=False, session=session)
        started = trio.current_time()
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            try:
                await stream.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                if sessions is not None:
                    sessions.discard(key)
                raise TunnelError("tls_failed", f"tls handshake with {where}: {exc}") from None
        if scope.cancelled_caught:
            raise TunnelError("tls_timeout", f"tls handshake with {where}: timed out")
        handshake_ms = (trio.current_time() - started) * 1000
        if stream.ssl.selected_alpn_protocol() != ALPN:
            raise TunnelError("alpn", f"server {where} did not agree to ALPN {ALPN!r}")
        try:
            cert = stream.peer_certificate()
            peer = identities.peer_identity(cert)
        except (PeerRejected, ssl.SSLError) as exc:
            raise TunnelError("peer_rejected", f"server {where}: {exc}") from None
        if peer != expected_identity:
            raise TunnelError(
                "identity_mismatch", f"server {where} is {peer}, expected {expected_identity}"
            )
        if sessions is not None and not stream.session_reused:
            # Only a new session is worth caching, and `SSLSocket.session` is costly (CPython
            # copies the session through i2d/d2i, parsing the peer's certificate again).
            fresh = stream.session
            if fresh is not None:
                sessions.put(key, context, fresh)
        conn = HboneConnection(
            stream,
            client=True,
            peer_identity=peer,
            peer_certificate=cert,
            peer_not_after=not_after(cert),
            context=context,
            credentials=TunnelCredentials(identities, source_identity, context, cert),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        return conn, TunnelInfo(peer, stream.session_reused, round(handshake_ms, 3))
    except BaseException:
        with trio.CancelScope(shield=True):
            if stream is not None:
                await stream.aclose()
            else:
                raw.close()
        raise


def not_after(der: bytes) -> float | None:
    """The certificate's notAfter as Unix time (None when it does not parse)."""
    try:
        return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    except ValueError:
        return None
