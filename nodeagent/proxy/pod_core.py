"""`PodCore`: what one pod's proxy paths share (netns, listeners, identity, snapshot, the node's
balance registry, counters) and the small helpers they all use: who this pod is in a snapshot,
audit lines, connecting from inside the pod's netns.

`OutboundPath` and `InboundPath` each take the one `PodCore` of their pod as a constructor
argument; `PodProxy` builds the three and runs the accept loops. State a path owns alone (the
L7 proxy, the open inbound connections) lives in that path, not here; the HBONE pool is here
because the L4 path and the L7 proxy's upstreams share it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from nodeagent.authn import Authenticator
from nodeagent.balance import Registry
from nodeagent.http import Limits
from nodeagent.identity.api import IdentityProvider
from nodeagent.inpod import Netns, PodListeners
from nodeagent.log import get_logger
from nodeagent.proxy.connection import CONNECT_TIMEOUT, IDENTITY_WAIT, ConnLog, PodProxyStats
from nodeagent.proxy.inbound import DestinationL7
from nodeagent.proxy.outbound import OutboundPolicy
from nodeagent.snapshot import Snapshot, Workload
from nodeagent.telemetry.dataplane import Sinks
from nodeagent.tunnel import SessionCache, TunnelPool

log = get_logger("proxy")


@dataclass(slots=True)
class PodCore:
    """One pod's proxy state shared by its outbound and inbound paths."""

    pod: str
    netns: Netns
    listeners: PodListeners
    registry: Registry  # the node's one balancer: L4 picks and the L7 proxy's
    workload: Workload | None = None  # this pod, as enrolled (the snapshot's copy wins)
    identities: IdentityProvider | None = None
    snapshot: Callable[[], Snapshot] = Snapshot.empty
    sessions: SessionCache = field(default_factory=SessionCache)
    outbound_policy: OutboundPolicy = "ALLOW_ANY"
    destination_l7: DestinationL7 = "always"  # `inbound.parses_requests` (agent flag)
    identity_wait: float = IDENTITY_WAIT
    telemetry: Sinks | None = None
    stats: PodProxyStats = field(default_factory=PodProxyStats)
    http_limits: Limits | None = None  # the L7 proxy's timeouts and bounds (agent flags)
    # The node's JWT verifier (its JWKS cache) for this pod's inbound HTTP requests.
    authenticator: Authenticator = field(default_factory=Authenticator)
    # This pod's HBONE connections (per source pod: they are opened from its netns, so the
    # destination sees this pod's IP); `sessions` is the node's TLS session cache behind them.
    pool: TunnelPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = TunnelPool(netns=self.netns, identities=self.identities, sessions=self.sessions)

    def me(self, snap: Snapshot) -> Workload | None:
        if self.workload is None:
            return None
        return snap.workload(self.workload.uid) or self.workload

    def audit(self, conn: ConnLog, audited: tuple[str, ...]) -> None:
        for policy in audited:
            log.info("authz.audit", conn=conn.cid, pod=self.pod, src=conn.src, policy=policy)

    async def connect(
        self, dst: tuple[str, int], bind_to: tuple[str, int] | None
    ) -> trio.SocketStream:
        """A TCP connection from inside the pod's netns (marked: it bypasses the capture);
        `bind_to` makes it transparent, from a peer's address."""
        sock = self.netns.socket(
            socket.AF_INET, socket.SOCK_STREAM, transparent=bind_to is not None
        )
        tsock = trio.socket.from_stdlib_socket(sock)
        try:
            if bind_to is not None:
                await tsock.bind(bind_to)
            with trio.fail_after(CONNECT_TIMEOUT):
                await tsock.connect(dst)
        except BaseException:
            tsock.close()
            raise
        return trio.SocketStream(tsock)
