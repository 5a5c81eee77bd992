"""A VirtualService's `http` and `tcp` routes as frozen dataclasses, compiled once per document.

`routes_compile.compile_routes` builds these when the snapshot converts a VirtualService: every
StringMatch carries its RE2 regex already compiled, durations are seconds, percentages floats,
gateway names qualified, destination hosts qualified with the VirtualService's namespace. The
routing decision (`nodeagent.routing`) reads only these typed fields; what depends on other
documents (which service a host is, a DestinationRule's subset labels) is looked up in the
snapshot per request, so a route never goes stale when a Service or DestinationRule changes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from nodeagent.config.regex import Regex

# Istio's default retry policy (when a route sets no `retries`): 2 attempts on these conditions,
# 503 being the retriable status code.
DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)

# gRPC status code → the `retryOn` condition naming it (Envoy's x-envoy-retry-grpc-on; the codes
# as numbers: `routing/grpc.py`'s GrpcStatus sits above this layer).
_GRPC_RETRY_ON = {
    1: "cancelled",
    4: "deadline-exceeded",
    8: "resource-exhausted",
    13: "internal",
    14: "unavailable",
}

StringMatchKind = Literal["exact", "prefix", "regex", "present"]


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio's StringMatch: exact, prefix or (full-string, RE2) regex; "present" when empty.

    With `ignore_case` (`ignoreUriCase`) exact and prefix compare case-folded (`value` is kept
    lower-cased) and the regex is compiled case-insensitive.
    """

    kind: StringMatchKind
    value: str = ""
    ignore_case: bool = False
    # The compiled pattern; equality goes by `value` (RE2 objects compare by identity).
    regex: Regex | None = field(default=None, compare=False, repr=False)


PRESENT = StringMatch("present")


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """One HTTPMatchRequest: every condition set must hold (AND).

    Header names are lower case, except the pseudo-headers (`:authority`, `:method`, `:path`,
    `:scheme`) which match request fields. `gateways` is None when the entry names none (the
    VirtualService's gateways apply), else the qualified `ns/name` refs (or "mesh").
    """

    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: Mapping[str, str] | None = None
    source_namespace: str | None = None
    gateways: frozenset[str] | None = None


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
        if not other:
            return self
        if not self:
            return other
        return HeaderOps(self.set + other.set, self.add + other.add, self.remove + other.remove)

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """A new header list (lower-case names) with the operations applied."""
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        out.extend((n.lower(), v) for n, v in self.set)
        out.extend((n.lower(), v) for n, v in self.add)
        return out


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True)
class Headers:
    """A route's or destination's `headers`: operations on the request and on the response."""

    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


@dataclass(frozen=True, slots=True)
class Destination:
    """An Istio Destination as written: `host` as given and qualified with the VirtualService's
    namespace (`fqdn`), optional subset and port, its weight and header operations."""

    host: str
    fqdn: str
    subset: str | None = None
    port: int | None = None
    weight: int = 100
    headers: Headers = Headers()


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

    def retriable_grpc(self, grpc_status: int) -> bool:
        """`retryOn` names this gRPC status (cancelled, deadline-exceeded, internal,
        resource-exhausted, unavailable), for a response whose head carries it."""
        name = _GRPC_RETRY_ON.get(grpc_status)
        return name is not None and name in self.retry_on

    def retriable_failure(
        self, kind: Literal["connect-failure", "reset", "timeout"], *, refused: bool = False
    ) -> bool:
        """`retryOn` covers this failure. `refused`: a reset that says the upstream never
        processed the stream (HTTP/2 REFUSED_STREAM, or above its GOAWAY's last stream id),
        which Envoy's `refused-stream` names (in Istio's default policy)."""
        on = self.retry_on
        if "5xx" in on:
            return True
        if refused and kind == "reset" and "refused-stream" in on:
            return True
        if kind == "timeout":
            return "gateway-error" in on
        if kind == "connect-failure":
            return bool(on & {"connect-failure", "gateway-error", "reset"})
        return bool(on & {"reset", "gateway-error", "reset-before-request"})


DEFAULT_RETRIES = RetryPolicy(attempts=2, per_try_timeout=None, retry_on=DEFAULT_RETRY_ON)
NO_RETRIES = RetryPolicy(attempts=0, per_try_timeout=None, retry_on=frozenset())


@dataclass(frozen=True, slots=True)
class FaultRule:
    """The configured fault injection; each request draws against the percentages."""

    delay: float | None = None  # seconds; None = no delay configured
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0
    abort_grpc_status: int | None = None  # `abort.grpcStatus`, as its number


@dataclass(frozen=True, slots=True)
class Rewrite:
    """`rewrite`: a new uri (prefix-aware), an RE2 `uriRegexRewrite`, a new authority."""

    uri: str | None = None
    authority: str | None = None
    uri_regex: StringMatch | None = None  # kind "regex"
    uri_regex_rewrite: str = ""


@dataclass(frozen=True, slots=True)
class RedirectRule:
    """`redirect` as configured; the Location is built per request."""

    status: int = 301
    scheme: str | None = None
    authority: str | None = None
    port: int | None = None
    port_from_request: bool = False  # derivePort: FROM_REQUEST_PORT
    uri: str | None = None


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: Destination
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """One `http` rule. `route_name` names it in logs and metrics (`ns/vs.<name|index>`),
    `name` is the rule's own `name` (if written); `matches` empty means "every request". The
    action is `redirect`, else `direct_response`, else forwarding to `destinations`."""

    route_name: str
    name: str | None = None
    matches: tuple[HttpMatch, ...] = ()
    destinations: tuple[Destination, ...] = ()
    redirect: RedirectRule | None = None
    direct_response: DirectResponse | None = None
    headers: Headers = Headers()
    rewrite: Rewrite | None = None
    timeout: float | None = None  # seconds; None = no route timeout
    retries: RetryPolicy = DEFAULT_RETRIES
    retries_configured: bool = False  # `retries` was written (explain reports defaults apart)
    fault: FaultRule | None = None
    mirror: Mirror | None = None


@dataclass(frozen=True, slots=True)
class TcpMatch:
    """One L4MatchAttributes entry: port, destination subnets and the source conditions."""

    port: int | None = None
    destination_subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    source_labels: Mapping[str, str] | None = None
    source_namespace: str | None = None
    gateways: frozenset[str] | None = None
    sni_hosts: tuple[str, ...] = ()  # a `tls` route's match (TLSMatchAttributes); lower case


@dataclass(frozen=True, slots=True)
class TcpRoute:
    route_name: str  # `ns/vs.<name|index>`
    matches: tuple[TcpMatch, ...] = ()
    destinations: tuple[Destination, ...] = ()
