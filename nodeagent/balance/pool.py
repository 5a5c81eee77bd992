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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nodeagent.balance.policy import ConnectionPool

LimitKind = Literal["connections", "pending", "requests", "retries"]


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

    __slots__ = ("_breaker", "_kind", "released")

    def __init__(self, breaker: CircuitBreaker, kind: LimitKind) -> None:
        self._breaker = breaker
        self._kind = kind
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._breaker._release(self._kind)

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
    tokens already held stay valid, new acquisitions see the new limits."""

    def __init__(self, cluster: str, limits: ConnectionPool) -> None:
        self.cluster = cluster
        self.limits = limits
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

    def _try(self, kind: LimitKind) -> Overflow | None:
        limit = self._limit(kind)
        if self.active[kind] >= limit:
            self.overflows[kind] += 1
            return Overflow(self.cluster, kind, limit)
        self.active[kind] += 1
        self.acquired[kind] += 1
        return None

    def _release(self, kind: LimitKind) -> None:
        if self.active[kind] > 0:
            self.active[kind] -= 1

    def try_acquire_connection(self) -> ConnectionToken | Overflow:
        return self._try("connections") or ConnectionToken(self)

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
        return {
            "active": dict(self.active),
            "acquired": dict(self.acquired),
            "overflow": dict(self.overflows),
        }
