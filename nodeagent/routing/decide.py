"""The routing decision: VirtualService rules → one `Decision`, with Istio/Envoy semantics.

Rules of every VirtualService that `Snapshot.routes_for(host, gateway)` returns are tried in that
order, first match wins. A rule's `match` list is OR, the conditions inside one entry are AND; a
rule without `match` matches everything. A host without any VirtualService gets the default route
to its own service (the mesh path) — or "no route" when there is no such service either.
Regexes are RE2-compatible by validation (`nodeagent.config.regex`) and match the whole string.
What a matched rule's decision derives from the snapshot alone (destinations, header operations,
retries, timeout) is cached per snapshot (`StaticsCache`); matching and random draws are not.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nodeagent.config.duration import DurationError, parse_duration
from nodeagent.routing.model import (
    DEFAULT_RETRIES,
    NO_RETRIES,
    Decision,
    DirectResponse,
    Fault,
    HeaderOps,
    Redirect,
    Request,
    RetryPolicy,
    RouteDestination,
    Source,
    TcpDecision,
    TcpRequest,
)
from nodeagent.snapshot import hosts
from nodeagent.snapshot.model import Service, VirtualService
from nodeagent.snapshot.snapshot import Snapshot

Rand = Callable[[], float]  # uniform in [0, 1)


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


def string_matches(m: Mapping[str, Any], value: str, *, ignore_case: bool = False) -> bool:
    """Istio StringMatch: exact, prefix or (full-string) regex; an empty match is "present"."""
    if (exact := m.get("exact")) is not None:
        return bool(value.lower() == exact.lower() if ignore_case else value == exact)
    if (prefix := m.get("prefix")) is not None:
        p = str(prefix)
        return value.lower().startswith(p.lower()) if ignore_case else value.startswith(p)
    if (regex := m.get("regex")) is not None:
        return _compiled(regex, ignore_case).fullmatch(value) is not None
    return True


def _header_matches(headers: Mapping[str, str], name: str, m: Mapping[str, Any]) -> bool:
    value = headers.get(name.lower())
    return value is not None and string_matches(m, value)


def _pseudo_header(request: Request, name: str) -> str | None:
    # Envoy lets header matches name pseudo-headers; Istio's docs use `:authority`/`:method`.
    return {
        ":authority": request.authority,
        ":method": request.method,
        ":path": request.target,
        ":scheme": request.scheme,
    }.get(name)


def _uri_match(m: Mapping[str, Any], request: Request, ignore_case: bool) -> bool:
    # Envoy: exact and regex path matches ignore the query string; a prefix sees the whole :path.
    if m.get("prefix") is not None:
        return string_matches(m, request.target, ignore_case=ignore_case)
    return string_matches(m, request.path, ignore_case=ignore_case)


def match_request(
    match: Mapping[str, Any], request: Request, source: Source, vs_namespace: str
) -> bool:
    """Whether one HTTPMatchRequest entry matches (every condition present must hold)."""
    ignore_case = bool(match.get("ignoreUriCase"))
    if (uri := match.get("uri")) is not None and not _uri_match(uri, request, ignore_case):
        return False
    if (scheme := match.get("scheme")) is not None and not string_matches(scheme, request.scheme):
        return False
    if (method := match.get("method")) is not None and not string_matches(method, request.method):
        return False
    authority = match.get("authority")
    if authority is not None and not string_matches(authority, request.authority):
        return False
    for name, m in (match.get("headers") or {}).items():
        pseudo = _pseudo_header(request, name)
        if pseudo is not None:
            if not string_matches(m, pseudo):
                return False
        elif not _header_matches(request.headers, name, m):
            return False
    for name, m in (match.get("withoutHeaders") or {}).items():
        if _header_matches(request.headers, name, m):
            return False
    if query_matches := match.get("queryParams"):
        params = request.query_params()
        for name, m in query_matches.items():
            value = params.get(name)
            if value is None or not string_matches(m, value):
                return False
    if (port := match.get("port")) is not None and port != request.port:
        return False
    return _source_matches(match, source, vs_namespace)


def _source_matches(match: Mapping[str, Any], source: Source, vs_namespace: str) -> bool:
    """The L4 conditions HTTP and TCP matches share: sourceLabels, sourceNamespace, gateways."""
    labels = match.get("sourceLabels")
    if labels and not hosts.labels_match(labels, source.labels):
        return False
    ns = match.get("sourceNamespace")
    if ns is not None and ns != source.namespace:
        return False
    gateways = match.get("gateways")
    if gateways:
        refs = {hosts.gateway_ref(g, vs_namespace) for g in gateways}
        if source.gateway not in refs:
            return False
    return True


def _rule_matches(
    rule: Mapping[str, Any], request: Request, source: Source, vs: VirtualService
) -> Mapping[str, Any] | None:
    """The matching HTTPMatchRequest of a rule ({} for a rule without matches), else None."""
    matches = rule.get("match")
    if not matches:
        return {}
    for m in matches:
        if match_request(m, request, source, vs.namespace):
            found: Mapping[str, Any] = m
            return found
    return None


# -- building the decision -------------------------------------------------------------------


def _seconds(text: Any) -> float | None:
    """A duration in seconds; "0s" (and absent) → None, Istio's "no timeout"."""
    if text is None:
        return None
    try:
        ns = parse_duration(text)
    except DurationError:
        return None  # validated on apply; a stored bad value must not crash the proxy
    return ns / 1e9 if ns > 0 else None


def _header_ops(doc: Mapping[str, Any] | None) -> HeaderOps:
    if not doc:
        return HeaderOps()
    return HeaderOps(
        set=tuple((str(k), str(v)) for k, v in (doc.get("set") or {}).items()),
        add=tuple((str(k), str(v)) for k, v in (doc.get("add") or {}).items()),
        remove=tuple(str(n) for n in doc.get("remove") or ()),
    )


def _percentage(doc: Mapping[str, Any], *, old_key: str = "percent") -> float:
    """`percentage.value` or the older integer `percent`; neither given means 100%."""
    if (p := doc.get("percentage")) is not None:
        return float(p.get("value", 0.0))
    if (old := doc.get(old_key)) is not None:
        return float(old)
    return 100.0


def _retries(doc: Mapping[str, Any] | None) -> RetryPolicy:
    if doc is None:
        return DEFAULT_RETRIES
    attempts = int(doc.get("attempts", DEFAULT_RETRIES.attempts))
    if attempts <= 0:
        return NO_RETRIES
    retry_on = set(DEFAULT_RETRIES.retry_on)
    codes: set[int] = set()
    if (text := doc.get("retryOn")) is not None:
        retry_on = set()
        for part in str(text).split(","):
            part = part.strip()
            if part.isdigit():
                codes.add(int(part))
                retry_on.add("retriable-status-codes")
            elif part:
                retry_on.add(part)
    return RetryPolicy(
        attempts=attempts,
        per_try_timeout=_seconds(doc.get("perTryTimeout")),
        retry_on=frozenset(retry_on),
        status_codes=frozenset(codes) if codes else DEFAULT_RETRIES.status_codes,
    )


def _fault(doc: Mapping[str, Any] | None, rand: Rand) -> Fault:
    if not doc:
        return Fault()
    delay = 0.0
    abort: int | None = None
    if (d := doc.get("delay")) is not None and rand() * 100 < _percentage(d):
        delay = _seconds(d.get("fixedDelay")) or 0.0
    if (a := doc.get("abort")) is not None and rand() * 100 < _percentage(a):
        abort = int(a["httpStatus"])
    return Fault(delay=delay, abort_status=abort)


def resolve_destination(
    snapshot: Snapshot,
    doc: Mapping[str, Any],
    *,
    namespace: str,
    source: Source,
    request_port: int | None,
    weight: int = 100,
    headers: Mapping[str, Any] | None = None,
) -> RouteDestination:
    """An Istio Destination (host, subset, port) → service, subset labels and service port."""
    raw_host = str(doc["host"])
    fqdn = hosts.qualify(raw_host, namespace, snapshot.cluster_domain)
    service = snapshot.service_by_host(fqdn) or snapshot.resolve_host(raw_host, namespace)
    host = service.hostname if service is not None and not hosts.is_wildcard(fqdn) else fqdn
    port = (doc.get("port") or {}).get("number")
    if port is None and service is not None:
        if len(service.ports) == 1:
            port = service.ports[0].port
        elif request_port is not None and service.port(request_port) is not None:
            port = request_port
    elif port is None:
        port = request_port
    doc_headers = headers or {}
    subset = doc.get("subset")
    labels = None
    error = None
    if subset:
        dr = snapshot.destination_rule(host, from_namespace=source.namespace or None)
        found = dr.subset(subset) if dr is not None else None
        if found is None:
            error = "NC"  # Envoy: no cluster for an undefined subset
        else:
            labels = found.labels
    return RouteDestination(
        host=host,
        service=service,
        port=port,
        weight=weight,
        subset=subset or None,
        subset_labels=labels,
        request_headers=_header_ops(doc_headers.get("request")),
        response_headers=_header_ops(doc_headers.get("response")),
        error=error,
    )


def _pick(destinations: tuple[RouteDestination, ...], rand: Rand) -> RouteDestination | None:
    total = sum(d.weight for d in destinations)
    if total <= 0:
        return destinations[0] if destinations else None
    point = rand() * total
    for d in destinations:
        if point < d.weight:
            return d
        point -= d.weight
    return destinations[-1]


def _rewrite_path(request: Request, rewrite: Mapping[str, Any], match: Mapping[str, Any]) -> str:
    """Envoy's rewrite: a prefix match replaces the matched prefix, other matches the whole path.

    One deviation from Envoy, as the issue asks: a rewrite ending in "/" joined to a remainder
    starting with "/" does not double the slash (`/my-app/x` with prefix `/my-app` → `/` gives
    `/x`, where Envoy would send `//x`).
    """
    target = request.target
    if (regex := rewrite.get("uriRegexRewrite")) is not None:
        new_path = _compiled(regex["match"]).sub(regex.get("rewrite", ""), request.path)
        return f"{new_path}?{request.query}" if request.query else new_path
    if rewrite.get("uri") is None:
        return target
    new = str(rewrite["uri"])
    uri = match.get("uri") or {}
    if uri.get("prefix") is not None or not uri:
        prefix = uri.get("prefix", "/") if uri else "/"
        rest = target[len(prefix) :]
        if new.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        out = new + rest
        return out if out.startswith("/") else "/" + out
    return f"{new}?{request.query}" if request.query else new


def _redirect(request: Request, doc: Mapping[str, Any]) -> Redirect:
    scheme = doc.get("scheme") or request.scheme
    authority = doc.get("authority") or request.authority
    port = doc.get("port")
    if doc.get("derivePort") == "FROM_REQUEST_PORT":
        port = request.port
    if port is not None:
        host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
        default = {"http": 80, "https": 443}.get(scheme)
        authority = host if port == default else f"{host}:{port}"
    uri = doc.get("uri")
    path = (
        request.target
        if uri is None
        else (uri if "?" in uri or not request.query else f"{uri}?{request.query}")
    )
    return Redirect(
        status=int(doc.get("redirectCode", 301)), location=f"{scheme}://{authority}{path}"
    )


def _direct(doc: Mapping[str, Any]) -> DirectResponse:
    body = doc.get("body") or {}
    if (s := body.get("string")) is not None:
        data = str(s).encode()
    elif (b := body.get("bytes")) is not None:
        data = base64.b64decode(b)
    else:
        data = b""
    return DirectResponse(status=int(doc["status"]), body=data)


def _route_name(vs: VirtualService, rule: Mapping[str, Any], index: int) -> str:
    return f"{vs.ref}.{rule.get('name') or index}"


class RuleStatics:
    """The parts of a route rule's Decision that depend only on the snapshot, the rule, the
    VirtualService's namespace, the source's namespace (DestinationRule lookup) and the request
    port (mesh routes): everything `build_decision` derives without the request's path,
    authority, headers or `rand`."""

    __slots__ = ("destinations", "request_headers", "response_headers", "retries", "timeout")

    def __init__(
        self,
        snapshot: Snapshot,
        rule: Mapping[str, Any],
        namespace: str,
        source: Source,
        request_port: int | None,
    ) -> None:
        self.request_headers = _header_ops((rule.get("headers") or {}).get("request"))
        self.response_headers = _header_ops((rule.get("headers") or {}).get("response"))
        self.destinations = tuple(
            resolve_destination(
                snapshot,
                r["destination"],
                namespace=namespace,
                source=source,
                request_port=request_port,
                weight=int(r.get("weight") or (100 if len(rule["route"]) == 1 else 0)),
                headers=r.get("headers"),
            )
            for r in rule.get("route") or ()
        )
        self.timeout = _seconds(rule.get("timeout"))
        self.retries = _retries(rule.get("retries"))


class StaticsCache:
    """`RuleStatics` per (rule, VirtualService namespace, source namespace, request port) of
    the snapshot routed last: a request matching a rule it matched before skips resolving its
    destinations (service, port, DestinationRule subset) and parsing its headers, retries and
    timeout. A different snapshot object empties the cache (snapshots are immutable, a new
    revision is a new object). The rule object is kept next to its id in the entry and compared
    by identity, so an id reused by another dict can never hit. Bounded: cleared when full."""

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self.enabled = True
        self._snapshot: Snapshot | None = None
        self._entries: dict[
            tuple[int, str, str, int | None], tuple[Mapping[str, Any], RuleStatics]
        ] = {}

    def get(
        self,
        snapshot: Snapshot,
        rule: Mapping[str, Any],
        namespace: str,
        source: Source,
        request_port: int | None,
    ) -> RuleStatics:
        if not self.enabled:
            return RuleStatics(snapshot, rule, namespace, source, request_port)
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._entries = {}
        key = (id(rule), namespace, source.namespace, request_port)
        found = self._entries.get(key)
        if found is not None and found[0] is rule:
            return found[1]
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries = {}
        statics = RuleStatics(snapshot, rule, namespace, source, request_port)
        self._entries[key] = (rule, statics)
        return statics


_STATICS = StaticsCache()


def build_decision(
    snapshot: Snapshot,
    source: Source,
    request: Request,
    vs: VirtualService,
    index: int,
    rule: Mapping[str, Any],
    match: Mapping[str, Any],
    rand: Rand,
) -> Decision:
    """The Decision for a rule that matched."""
    name = _route_name(vs, rule, index)
    if (redirect := rule.get("redirect")) is not None:
        return Decision(
            kind="redirect",
            route_name=name,
            redirect=_redirect(request, redirect),
            response_headers=_header_ops((rule.get("headers") or {}).get("response")),
        )
    if (direct := rule.get("directResponse")) is not None:
        return Decision(
            kind="direct",
            route_name=name,
            direct=_direct(direct),
            response_headers=_header_ops((rule.get("headers") or {}).get("response")),
        )
    request_port = request.port if source.gateway == hosts.MESH_GATEWAY else None
    statics = _STATICS.get(snapshot, rule, vs.namespace, source, request_port)
    destinations = statics.destinations
    request_headers = statics.request_headers
    response_headers = statics.response_headers
    chosen = _pick(destinations, rand)
    fault = _fault(rule.get("fault"), rand)
    mirror = None
    if (m := rule.get("mirror")) is not None:
        pct = rule.get("mirrorPercentage")
        percent = (
            float(pct.get("value", 0.0))
            if pct is not None
            else float(rule.get("mirrorPercent", 100))
        )
        if rand() * 100 < percent:
            mirror = resolve_destination(
                snapshot, m, namespace=vs.namespace, source=source, request_port=request.port
            )
    rewrite = rule.get("rewrite") or {}
    authority = rewrite.get("authority") or request.authority
    if chosen is not None:
        request_headers = request_headers.then(chosen.request_headers)
        response_headers = response_headers.then(chosen.response_headers)
    return Decision(
        kind="route",
        route_name=name,
        destinations=destinations,
        chosen=chosen,
        path=_rewrite_path(request, rewrite, match),
        authority=authority,
        request_headers=request_headers,
        response_headers=response_headers,
        timeout=statics.timeout,
        retries=statics.retries,
        fault=fault,
        mirror=mirror,
    )


def _routing_host(
    snapshot: Snapshot, source: Source, request: Request
) -> tuple[str, Service | None]:
    if request.host is not None:
        host = hosts.normalize(request.host)
        return host, snapshot.service_by_host(host)
    host = hosts.normalize(request.authority_host)
    service = None
    if source.gateway == hosts.MESH_GATEWAY:
        service = snapshot.resolve_host(host, source.namespace or "default")
        if service is not None:
            host = service.hostname
    return host, service


def decide(
    snapshot: Snapshot,
    source: Source,
    request: Request,
    *,
    rand: Rand | None = None,
) -> Decision:
    """Route one HTTP request. `rand` (uniform [0,1)) drives weights, fault and mirror sampling."""
    if rand is None:
        import random

        rand = random.random
    host, service = _routing_host(snapshot, source, request)
    virtual_services = snapshot.routes_for(host, source.gateway)
    for vs in virtual_services:
        for index, rule in enumerate(vs.http):
            match = _rule_matches(rule, request, source, vs)
            if match is not None:
                return build_decision(snapshot, source, request, vs, index, rule, match, rand)
    if virtual_services or service is None or source.gateway != hosts.MESH_GATEWAY:
        return Decision(kind="no_route", route_name="")
    dest = RouteDestination(
        host=service.hostname,
        service=service,
        port=request.port if service.port(request.port) is not None else _single_port(service),
    )
    return Decision(
        kind="route",
        route_name="default",
        destinations=(dest,),
        chosen=dest,
        path=request.target,
        authority=request.authority,
    )


def _single_port(service: Service) -> int | None:
    return service.ports[0].port if len(service.ports) == 1 else None


# -- TCP ----------------------------------------------------------------------------------


def _subnet_matches(subnets: Iterable[str], ip: str | None) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(s, strict=False) for s in subnets)
    except ValueError:
        return False


def decide_tcp(
    snapshot: Snapshot,
    source: Source,
    request: TcpRequest,
    *,
    rand: Rand | None = None,
) -> TcpDecision:
    """Route one TCP connection by the VirtualServices' `tcp` rules (weights, no L7 matches).

    No VirtualService with a matching tcp rule: the default route to the addressed service.
    """
    if rand is None:
        import random

        rand = random.random
    host = hosts.normalize(request.host)
    for vs in snapshot.routes_for(host, source.gateway):
        for index, rule in enumerate(vs.tcp):
            if not _tcp_rule_matches(rule, request, source, vs.namespace):
                continue
            destinations = tuple(
                resolve_destination(
                    snapshot,
                    r["destination"],
                    namespace=vs.namespace,
                    source=source,
                    request_port=request.port,
                    weight=int(r.get("weight") or (100 if len(rule["route"]) == 1 else 0)),
                )
                for r in rule["route"]
            )
            return TcpDecision(
                route_name=_route_name(vs, rule, index),
                destinations=destinations,
                chosen=_pick(destinations, rand),
            )
    service = snapshot.service_by_host(host)
    if service is None:
        return TcpDecision(route_name="")
    dest = RouteDestination(
        host=service.hostname,
        service=service,
        port=request.port if service.port(request.port) is not None else _single_port(service),
    )
    return TcpDecision(route_name="default", destinations=(dest,), chosen=dest)


def _tcp_rule_matches(
    rule: Mapping[str, Any], request: TcpRequest, source: Source, namespace: str
) -> bool:
    matches = rule.get("match")
    if not matches:
        return True
    for m in matches:
        if (port := m.get("port")) is not None and port != request.port:
            continue
        subnets = m.get("destinationSubnets")
        if subnets and not _subnet_matches(subnets, request.destination_ip):
            continue
        if _source_matches(m, source, namespace):
            return True
    return False
