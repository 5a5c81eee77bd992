"""`PodCore`: the state one pod's proxy shares between its paths (netns, listeners, identity,
snapshot, picker, counters, open inbound connections) and the small helpers they all use: who
this pod is in a snapshot, audit lines, connecting from inside the pod's netns.

`OutboundPath` and `InboundPath` extend it with one direction each; `PodProxy` combines them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from nodeagent.http import HttpProxy, Limits
from nodeagent.identity.api import IdentityProvider
from nodeagent.inpod import Netns, PodListeners
from nodeagent.log import get_logger
from nodeagent.proxy.connection import CONNECT_TIMEOUT, IDENTITY_WAIT, ConnLog, PodProxyStats
from nodeagent.proxy.inbound import LiveConnections
from nodeagent.proxy.outbound import EndpointPicker, OutboundPolicy, RoundRobinPicker
from nodeagent.snapshot import Snapshot, Workload
from nodeagent.telemetry.dataplane import Sinks
from nodeagent.tunnel import SessionCache

log = get_logger("proxy")


def _empty_snapshot() -> Snapshot:
    return Snapshot.empty()


class PodCore:
    """The pod proxy's state and the helpers shared by its outbound and inbound paths."""

    def __init__(
        self,
        pod: str,
        netns: Netns,
        listeners: PodListeners,
        *,
        workload: Workload | None = None,
        identities: IdentityProvider | None = None,
        snapshot: Callable[[], Snapshot] = _empty_snapshot,
        picker: EndpointPicker | None = None,
        sessions: SessionCache | None = None,
        outbound_policy: OutboundPolicy = "ALLOW_ANY",
        identity_wait: float = IDENTITY_WAIT,
        telemetry: Sinks | None = None,
        http_limits: Limits | None = None,
    ) -> None:
        self.pod = pod
        self.http_limits = http_limits  # the L7 proxy's timeouts and bounds (agent flags)
        self.telemetry = telemetry
        self.netns = netns
        self.listeners = listeners
        self.workload = workload  # this pod, as enrolled (the snapshot's copy wins when present)
        self.identities = identities
        self.snapshot = snapshot
        self.picker = picker if picker is not None else RoundRobinPicker()
        self.sessions = sessions if sessions is not None else SessionCache()
        self.outbound_policy: OutboundPolicy = outbound_policy
        self.identity_wait = identity_wait
        self.stats = PodProxyStats()
        self._http: HttpProxy | None = None  # made on the first HTTP connection
        self.live = LiveConnections()  # open inbound connections, re-checked on policy changes
        self._policy_poke = trio.Event()

    def _me(self, snap: Snapshot) -> Workload | None:
        if self.workload is None:
            return None
        return snap.workload(self.workload.uid) or self.workload

    def _audit(self, conn: ConnLog, audited: tuple[str, ...]) -> None:
        for policy in audited:
            log.info("authz.audit", conn=conn.cid, pod=self.pod, src=conn.src, policy=policy)

    async def _connect(
        self, dst: tuple[str, int], bind_to: tuple[str, int] | None
    ) -> trio.SocketStream:
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
