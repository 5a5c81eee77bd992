"""The routing inputs (who asks, what is asked) and the decision the byte mover executes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from urllib.parse import parse_qsl

from nodeagent.snapshot.model import Service

_EMPTY: Mapping[str, str] = MappingProxyType({})

MESH = "mesh"

# Istio's default retry policy (when a route sets no `retries`): 2 attempts on these conditions,
# 503 being the retriable status code.
DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)


@dataclass(frozen=True, slots=True)
class Source:
    """The caller: a mesh workload (namespace, labels) or an ingress gateway (`ns/name`)."""

    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    gateway: str = MESH  # "mesh" for pod traffic, "ns/name" for a Gateway's listener


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as routing sees it.

    `path` excludes the query string, `query` is what follows `?` (without it). Header names are
    lower case; repeated headers are joined with ", ". `host` is the service host the connection
    was addressed to (the mesh path knows it from the VIP); None means "route by authority"
    (the gateway path).
    """

    method: str
    authority: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    port: int = 80
    scheme: str = "http"
    host: str | None = None

    @property
    def target(self) -> str:
        """The request target as sent on the wire: path plus query."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def authority_host(self) -> str:
        """The authority without a port (IPv6 brackets kept)."""
        a = self.authority
        if a.startswith("["):
            return a[: a.find("]") + 1] if "]" in a else a
        return a.rsplit(":", 1)[0] if ":" in a else a

    def query_params(self) -> dict[str, str]:
        """The first value of each query parameter (Envoy's query_parameter matcher)."""
        out: dict[str, str] = {}
        for k, v in parse_qsl(self.query, keep_blank_values=True):
            out.setdefault(k, v)
        return out

    @classmethod
    def from_target(
        cls,
        method: str,
        authority: str,
        target: str,
        headers: Mapping[str, str] | None = None,
        **kw: object,
    ) -> Request:
        path, _, query = target.partition("?")
        return cls(method, authority, path, query, headers or _EMPTY, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header manipulation in Istio's order: remove, then set (replace), then add (append)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def then(self, other: HeaderOps) -> HeaderOps:
        """These operations followed by `other` (route-level, then destination-level)."""
        return HeaderOps(self.set + other.set, self.add + other.add, self.remove + other.remove)

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """A new header list (lower-case names) with the operations applied."""
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        out.extend((n.lower(), v) for n, v in self.set)
        out.extend((n.lower(), v) for n, v in self.add)
        return out


@dataclass(frozen=True, slots=True)
class RouteDestination:
    """One weighted destination, resolved against the snapshot.

    `service` is None when the host names no known service; `subset_labels` is None when no
    subset was asked; `error` is set when the destination cannot be served ("NC": the subset is
    not defined in any DestinationRule, "UH"-worthy problems are found later, at pick time).
    """

    host: str
    service: Service | None
    port: int | None
    weight: int = 100
    subset: str | None = None
    subset_labels: Mapping[str, str] | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()
    error: str | None = None

    @property
    def name(self) -> str:
        """Envoy-like cluster name: outbound|port|subset|host."""
        return f"outbound|{self.port or ''}|{self.subset or ''}|{self.host}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # retries after the first try (Istio's `attempts`); 0 = no retries
    per_try_timeout: float | None  # seconds; None = only the route timeout applies
    retry_on: frozenset[str]
    status_codes: frozenset[int] = frozenset({503})

    def retriable_status(self, status: int) -> bool:
        on = self.retry_on
        if "5xx" in on and status >= 500:
            return True
        if "gateway-error" in on and status in (502, 503, 504):
            return True
        if "retriable-4xx" in on and status == 409:
            return True
        return "retriable-status-codes" in on and status in self.status_codes

    def retriable_failure(self, kind: Literal["connect-failure", "reset", "timeout"]) -> bool:
        on = self.retry_on
        if "5xx" in on:
            return True
        if kind == "timeout":
            return "gateway-error" in on
        if kind == "connect-failure":
            return bool(on & {"connect-failure", "gateway-error", "reset"})
        return bool(on & {"reset", "gateway-error", "reset-before-request"})


DEFAULT_RETRIES = RetryPolicy(attempts=2, per_try_timeout=None, retry_on=DEFAULT_RETRY_ON)
NO_RETRIES = RetryPolicy(attempts=0, per_try_timeout=None, retry_on=frozenset())


@dataclass(frozen=True, slots=True)
class Fault:
    """The fault this request gets (already sampled): a delay, an abort, or both."""

    delay: float = 0.0  # seconds
    abort_status: int | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int
    location: str


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


DecisionKind = Literal["route", "redirect", "direct", "no_route"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one request.

    kind "route": forward to `chosen` (one of `destinations`), with the path/authority rewritten
    to `path`/`authority`; "redirect"/"direct": answer locally; "no_route": 404 with flag NR.
    `route_name` names the rule for logs and metrics (`ns/vs.rule` or `default`).
    """

    kind: DecisionKind
    route_name: str = ""
    destinations: tuple[RouteDestination, ...] = ()
    chosen: RouteDestination | None = None
    path: str = "/"  # the request target (path + query) to send upstream
    authority: str = ""
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()
    timeout: float | None = None  # seconds; None = no route timeout
    retries: RetryPolicy = DEFAULT_RETRIES
    fault: Fault = Fault()
    mirror: RouteDestination | None = None
    redirect: Redirect | None = None
    direct: DirectResponse | None = None


@dataclass(frozen=True, slots=True)
class TcpRequest:
    """A TCP connection as L4 routing sees it: the service host and port it was addressed to."""

    host: str
    port: int
    destination_ip: str | None = None


@dataclass(frozen=True, slots=True)
class TcpDecision:
    route_name: str
    destinations: tuple[RouteDestination, ...] = ()
    chosen: RouteDestination | None = None
