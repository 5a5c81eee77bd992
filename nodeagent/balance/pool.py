"""Circuit breaking: connection-pool accounting per cluster, Envoy's circuit breakers.

Nothing here waits. `try_acquire_*` returns a token (release it exactly once, when the
connection closes or the request ends; releasing twice is harmless) or an `Overflow`, which the
proxy turns into an immediate 503 with response flag UO (L4: it closes the client connection).
Counters say how often each limit overflowed, for metrics.

Which limit applies when is the proxy's decision, as in Envoy:
- a new upstream connection: `try_acquire_connection()` (tcp.maxConnections);
- an HTTP/1 request that finds no free connection and may not open one waits in the pending
  queue: `try_acquire_pending()` (http.http1MaxPendingRequests), released when it gets a
  connection or gives up (after `connect_timeout_s` at most: nothing waits forever);
- every active request: `try_acquire_request()` (http.http2MaxRequests);
- every retry: `try_acquire_retry()` (http.maxRetries); on overflow, no retry is made and the
  last response goes back to the client;
- a connection's `note_request()` says when http.maxRequestsPerConnection is reached.

With `--workers N` the counts live in a table every worker maps (`balance.shared`): each
limit bounds the node's sum over the workers, as Envoy's bound the sum over its threads.
`active` is always this process's own share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from nodeagent.balance.policy import ConnectionPool
from nodeagent.balance.shared import KINDS, SharedSlot

LimitKind = Literal["connections", "pending", "requests", "retries"]
_INDEX: dict[LimitKind, int] = {"connections": 0, "pending": 1, "requests": 2, "retries": 3}
assert tuple(_INDEX) == KINDS


@dataclass(frozen=True, slots=True)
class Overflow:
    """A limit was reached: answer 503 UO now."""

    cluster: str
    kind: LimitKind
    limit: int

    status = 503
    flag = "UO"

    def __str__(self) -> str:
        return f"{self.cluster}: {self.kind} limit {self.limit} reached (503 UO)"


class Token:
    """One unit of a limit, held until released."""

    __slots__ = ("_breaker", "_kind", "on_release", "released")

    def __init__(self, breaker: CircuitBreaker, kind: LimitKind) -> None:
        self._breaker = breaker
        self._kind = kind
        self.released = False
        self.on_release: Callable[[], None] | None = None  # the holder's own bookkeeping

    @property
    def cluster(self) -> str:
        return self._breaker.cluster

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._breaker._release(self._kind)
            if self.on_release is not None:
                self.on_release()

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ConnectionToken(Token):
    """A connection slot; also counts the requests made on that connection."""

    __slots__ = ("requests",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        super().__init__(breaker, "connections")
        self.requests = 0

    def note_request(self) -> bool:
        """Count one request on this connection; True when the connection must close after it
        (maxRequestsPerConnection reached)."""
        self.requests += 1
        limit = self._breaker.limits.max_requests_per_connection
        return limit > 0 and self.requests >= limit


class CircuitBreaker:
    """The counters of one cluster. Limits can change under live tokens (a policy update):
    tokens already held stay valid, new acquisitions see the new limits. With a `shared` slot
    the limits apply to the node's sum (every worker's), not to this process alone."""

    def __init__(
        self, cluster: str, limits: ConnectionPool, *, shared: SharedSlot | None = None
    ) -> None:
        self.cluster = cluster
        self.limits = limits
        self.shared = shared
        self.active: dict[LimitKind, int] = {
            "connections": 0,
            "pending": 0,
            "requests": 0,
            "retries": 0,
        }
        self.overflows: dict[LimitKind, int] = {
            "connections": 0,
            "pending": 0,
            "requests": 0,
            "retries": 0,
        }
        self.acquired: dict[LimitKind, int] = {
            "connections": 0,
            "pending": 0,
            "requests": 0,
            "retries": 0,
        }

    def _limit(self, kind: LimitKind) -> int:
        lim = self.limits
        if kind == "connections":
            return lim.max_connections
        if kind == "pending":
            return lim.max_pending_requests
        if kind == "requests":
            return lim.max_requests
        return lim.max_retries

    def in_use(self, kind: LimitKind) -> int:
        """What the limit of `kind` is checked against: the node's count (every worker's)."""
        if self.shared is not None:
            return self.shared.total(_INDEX[kind])
        return self.active[kind]

    def full(self, kind: LimitKind) -> bool:
        return self.in_use(kind) >= self._limit(kind)

    def _take(self, kind: LimitKind) -> None:
        self.active[kind] += 1
        self.acquired[kind] += 1
        if self.shared is not None:
            self.shared.add(_INDEX[kind], 1)

    def _try(self, kind: LimitKind) -> Overflow | None:
        limit = self._limit(kind)
        if self.in_use(kind) >= limit:
            self.overflows[kind] += 1
            return Overflow(self.cluster, kind, limit)
        self._take(kind)
        return None

    def _release(self, kind: LimitKind) -> None:
        if self.active[kind] > 0:
            self.active[kind] -= 1
            if self.shared is not None:
                self.shared.add(_INDEX[kind], -1)

    def try_acquire_connection(self) -> ConnectionToken | Overflow:
        return self._try("connections") or ConnectionToken(self)

    def acquire_connection_over_limit(self) -> ConnectionToken:
        """A connection slot past `tcp.maxConnections`, for a pool that holds no connection of
        this cluster (`ClusterHolds`): each pool may always have one, so none starves behind
        the slots other pools (other source pods, other workers) hold idle. Envoy guarantees
        the same per picked host ("at least one connection allocated"); this is per cluster,
        so the count passes the limit by at most the number of pools. Call it only after
        `try_acquire_connection` overflowed."""
        self._take("connections")
        return ConnectionToken(self)

    def try_acquire_pending(self) -> Token | Overflow:
        return self._try("pending") or Token(self, "pending")

    def try_acquire_request(self) -> Token | Overflow:
        return self._try("requests") or Token(self, "requests")

    def try_acquire_retry(self) -> Token | Overflow:
        return self._try("retries") or Token(self, "retries")

    @property
    def connect_timeout_s(self) -> float:
        return self.limits.connect_timeout_s

    def statistics(self) -> dict[str, dict[LimitKind, int]]:
        stats = {
            "active": dict(self.active),
            "acquired": dict(self.acquired),
            "overflow": dict(self.overflows),
        }
        if self.shared is not None:
            stats["node"] = {kind: self.in_use(kind) for kind in self.active}
        return stats


class ClusterHolds:
    """How many connection slots one pool holds per cluster (connecting, busy or idle)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def holds(self, cluster: str) -> bool:
        return self._held.get(cluster, 0) > 0

    def hold(self, token: ConnectionToken) -> None:
        """Count `token` until it is released."""
        cluster = token.cluster
        self._held[cluster] = self._held.get(cluster, 0) + 1

        def released() -> None:
            left = self._held.get(cluster, 0) - 1
            if left > 0:
                self._held[cluster] = left
            else:
                self._held.pop(cluster, None)

        token.on_release = released

    def connection(self, breaker: CircuitBreaker) -> ConnectionToken | Overflow:
        """`breaker`'s connection slot for this pool: within the limit, or past it when this
        pool holds none of the cluster's; the slot is counted here until released."""
        got = breaker.try_acquire_connection()
        if isinstance(got, Overflow) and not self.holds(breaker.cluster):
            got = breaker.acquire_connection_over_limit()
        if not isinstance(got, Overflow):
            self.hold(got)
        return got
