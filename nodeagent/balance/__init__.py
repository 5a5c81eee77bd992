"""Load balancing, outlier detection and circuit breaking: a pure engine the proxies call.

No sockets, no trio: time comes from an injected clock, randomness from an injected
`random.Random`. The L4 proxy and the HTTP engine ask the `Registry` for the `Picker` of a
cluster (service, subset, port), pick an endpoint per connection or request, bracket the work
with `handle.start()` / `handle.finish(latency_s, outcome)`, and take circuit-breaker tokens
from `picker.breaker`. See docs/resilience.md.
"""

from __future__ import annotations

from nodeagent.balance.errors import BalanceError, NoHealthyUpstream, PolicyError
from nodeagent.balance.outlier import OutlierEvent
from nodeagent.balance.picker import Picker
from nodeagent.balance.policy import (
    ConnectionPool,
    ConsistentHash,
    LoadBalancer,
    OutlierDetection,
    TrafficPolicy,
    UpstreamTls,
    resolve,
)
from nodeagent.balance.pool import CircuitBreaker, ConnectionToken, Overflow, Token
from nodeagent.balance.registry import Registry, cluster_name
from nodeagent.balance.state import NO_CONTEXT, EndpointState, Outcome, PickContext

__all__ = [
    "NO_CONTEXT",
    "BalanceError",
    "CircuitBreaker",
    "ConnectionPool",
    "ConnectionToken",
    "ConsistentHash",
    "EndpointState",
    "LoadBalancer",
    "NoHealthyUpstream",
    "Outcome",
    "OutlierDetection",
    "OutlierEvent",
    "Overflow",
    "PickContext",
    "Picker",
    "PolicyError",
    "Registry",
    "Token",
    "TrafficPolicy",
    "UpstreamTls",
    "cluster_name",
    "resolve",
]
