"""`MeshConnector`: how the L7 proxy (a pod's, or the ingress gateway's) opens upstream streams,
one HBONE CONNECT stream (on the source's pooled mTLS connections) per pooled HTTP upstream
connection to a meshed endpoint, plain TCP to the rest; `denied_by_policy` says whether a tunnel
failure was the destination's authorization refusing it (status 401).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from nodeagent.http.errors import UpstreamDenied
from nodeagent.identity.api import IdentityProvider, IdentityUnavailable
from nodeagent.inpod import Netns
from nodeagent.proxy.connection import CONNECT_TIMEOUT, IDENTITY_WAIT, DirectionStats
from nodeagent.snapshot import Endpoint
from nodeagent.telemetry.tracing import CURRENT_TRACE, tunnel_trace
from nodeagent.tunnel import ConnectRequest, SourceInfo, TunnelError, TunnelPool


class MeshConnector:
    """Opens the L7 proxy's upstream streams: a CONNECT stream through `pool` to a meshed endpoint
    (with the source identity's certificate, the endpoint workload's identity required), a plain
    TCP connection from `netns` to an endpoint outside the mesh.

    `source()` is who connects (None: no mesh identity, so meshed endpoints are refused rather
    than reached in plaintext). Failures are raised as OSError, which the HTTP proxy answers with
    503 UF (and may retry on another endpoint).
    """

    def __init__(
        self,
        *,
        netns: Netns,
        identities: IdentityProvider | None,
        source: Callable[[], SourceInfo | None],
        pool: TunnelPool,
        identity_wait: float = IDENTITY_WAIT,
        stats: DirectionStats | None = None,
        label: str = "",
        mark: int | None = None,
    ) -> None:
        self.netns = netns
        self.identities = identities
        self.source = source
        self.pool = pool
        self.identity_wait = identity_wait
        self.stats = stats
        self.label = label
        self.mark = mark

    async def __call__(self, endpoint: Endpoint, service_port: int) -> trio.abc.Stream:
        workload = endpoint.workload
        where = f"{endpoint.address}:{endpoint.port}"
        if workload is None or not workload.identity:
            return await self._plain(endpoint.address, endpoint.port)
        me = self.source()
        if me is None or self.identities is None:
            raise OSError(f"connect {where}: {self.label} has no mesh identity: no plaintext")
        try:
            await self.identities.wait_ready(me.identity, self.identity_wait)
            stream, _ = await self.pool.open_stream(
                source_identity=me.identity,
                expected_identity=workload.identity,
                request=ConnectRequest(
                    endpoint.address,
                    endpoint.port,
                    source=me,
                    # The request that opens this connection: its CLIENT span is the parent of
                    # the destination agent's SERVER span.
                    trace=tuple(tunnel_trace(CURRENT_TRACE.get()).items()),
                    # This proxy reports every request it sends on the stream.
                    source_reported=True,
                ),
            )
        except TunnelError as exc:
            if denied_by_policy(exc):
                raise UpstreamDenied(
                    f"tunnel to {where} ({workload.identity}): {exc.msg}"
                ) from None
            raise OSError(f"tunnel to {where} ({workload.identity}): {exc.msg}") from None
        except IdentityUnavailable as exc:
            raise OSError(f"tunnel to {where}: no certificate for {me.identity}: {exc}") from None
        if self.stats is not None:
            self.stats.mtls += 1
        return stream

    async def _plain(self, address: str, port: int) -> trio.SocketStream:
        if self.mark is None:
            sock = self.netns.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            sock = self.netns.socket(socket.AF_INET, socket.SOCK_STREAM, mark=self.mark)
        tsock = trio.socket.from_stdlib_socket(sock)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await tsock.connect((address, port))
        except BaseException:
            tsock.close()
            raise
        return trio.SocketStream(tsock)


def denied_by_policy(exc: TunnelError) -> bool:
    """The destination's authorization policy refused the stream (its 401 status)."""
    return exc.denied
