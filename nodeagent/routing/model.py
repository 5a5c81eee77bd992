"""The routing inputs (who asks, what is asked) and the decision the byte mover executes.

The configured parts a decision carries (header operations, retry policy, direct response) are
the VirtualService's compiled route types (`nodeagent.snapshot.routes`), shared, not copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from urllib.parse import parse_qsl

from nodeagent.snapshot.model import Service, VirtualService
from nodeagent.snapshot.routes import (
    DEFAULT_RETRIES,
    NO_HEADER_OPS,
    DirectResponse,
    HeaderOps,
    HttpMatch,
    HttpRoute,
    RetryPolicy,
)

_EMPTY: Mapping[str, str] = MappingProxyType({})

MESH = "mesh"


@dataclass(frozen=True, slots=True)
class Source:
    """The caller: a mesh workload (namespace, labels) or an ingress gateway (`ns/name`)."""

    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    gateway: str = MESH  # "mesh" for pod traffic, "ns/name" for a Gateway's listener
    # A Gateway HTTP server with `tls.httpsRedirect`: every request is answered 301 to https.
    require_tls: bool = False


@dataclass(frozen=True, slots=True)
class HttpRequest:
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
    ) -> HttpRequest:
        path, _, query = target.partition("?")
        return cls(method, authority, path, query, headers or _EMPTY, **kw)  # type: ignore[arg-type]


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
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    error: str | None = None

    @property
    def name(self) -> str:
        """Envoy-like cluster name: outbound|port|subset|host."""
        return f"outbound|{self.port or ''}|{self.subset or ''}|{self.host}"


@dataclass(frozen=True, slots=True)
class Fault:
    """The fault this request gets (already sampled): a delay, an abort, or both."""

    delay: float = 0.0  # seconds
    abort_status: int | None = None
    abort_grpc_status: int | None = None  # `abort.grpcStatus`: a gRPC answer (HTTP 200)


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int
    location: str


@dataclass(frozen=True, slots=True)
class MatchedRule:
    """Which compiled rule a decision came from: the VirtualService, the rule's index, the rule,
    and the entry of its `match` list that matched (None for a rule without matches)."""

    virtual_service: VirtualService
    index: int
    route: HttpRoute
    match: HttpMatch | None


RouteDecisionKind = Literal["route", "redirect", "direct", "no_route"]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """What to do with one request.

    kind "route": forward to `chosen` (one of `destinations`), with the path/authority rewritten
    to `path`/`authority`; "redirect"/"direct": answer locally; "no_route": 404 with flag NR.
    `route_name` names the rule for logs and metrics (`ns/vs.rule` or `default`).
    """

    kind: RouteDecisionKind
    route_name: str = ""
    destinations: tuple[RouteDestination, ...] = ()
    chosen: RouteDestination | None = None
    path: str = "/"  # the request target (path + query) to send upstream
    authority: str = ""
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    timeout: float | None = None  # seconds; None = no route timeout
    retries: RetryPolicy = DEFAULT_RETRIES
    fault: Fault = Fault()
    mirror: RouteDestination | None = None
    redirect: Redirect | None = None
    direct: DirectResponse | None = None
    matched: MatchedRule | None = None  # None for the default route and no_route


@dataclass(frozen=True, slots=True)
class TcpRequest:
    """A TCP connection as L4 routing sees it: the service host and port it was addressed to."""

    host: str
    port: int
    destination_ip: str | None = None


@dataclass(frozen=True, slots=True)
class TlsRequest:
    """A TLS connection routed without terminating it: its SNI and the port it arrived on."""

    sni: str
    port: int


@dataclass(frozen=True, slots=True)
class TcpRouteDecision:
    route_name: str
    destinations: tuple[RouteDestination, ...] = ()
    chosen: RouteDestination | None = None
