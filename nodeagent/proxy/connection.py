"""What every path of a pod proxy shares: timeouts, per-direction counters, the record behind a
connection's one log line (`ConnLog`; a tunnel stream is a connection of its own), the `Denied`
and `SelfCall` outcomes. No I/O here.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from nodeagent.proxy import self_call
from nodeagent.proxy.relay import RelayResult
from nodeagent.telemetry.dataplane import TcpRecorder

CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 3600.0
IDENTITY_WAIT = 5.0  # how long a new pod's connection waits for its first certificate
_conn_ids = itertools.count(1)


@dataclass(slots=True)
class DirectionStats:
    opened: int = 0
    closed: int = 0
    failed: int = 0
    denied: int = 0
    mtls: int = 0  # of `opened`, those that crossed the tunnel (15008 in, or tunneled out)
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(slots=True)
class PodProxyStats:
    outbound: DirectionStats = field(default_factory=DirectionStats)
    inbound: DirectionStats = field(default_factory=DirectionStats)  # 15006 and 15008


class Denied(Exception):
    """A connection refused (policy, REGISTRY_ONLY, a balancer limit): its flag and, for an
    authorization denial, the policy."""

    def __init__(self, flag: str, reason: str, policy: str | None = None) -> None:
        super().__init__(reason)
        self.flag = flag
        self.policy = policy


class SelfCall(Denied):
    """A connection refused because its target is one of the agent's own listeners
    (`self_call.py`): `port` is the listener port it named."""

    def __init__(self, reason: str, port: int) -> None:
        super().__init__(self_call.FLAG, reason)
        self.port = port


@dataclass(slots=True)
class ConnLog:
    """What the one log line of a connection says; filled in as the connection progresses."""

    kind: str
    src: str = "?"
    dst: str = "?"
    endpoint: str | None = None
    src_identity: str | None = None
    dst_identity: str | None = None
    service: str | None = None
    result: str = "ok"
    flag: str | None = None
    policy: str | None = None
    error: str | None = None
    resumed: bool | None = None
    pooled: bool | None = None  # outbound tunnel: the stream went on an already open connection
    relay: RelayResult | None = None
    tel: TcpRecorder | None = None  # Istio metrics + access log, once both peers are known
    cid: int = field(default_factory=lambda: next(_conn_ids))
    started: float = field(default_factory=time.monotonic)

    def opened(self) -> None:
        """Bytes can flow now: count the connection as opened."""
        if self.tel is not None:
            self.tel.opened()
