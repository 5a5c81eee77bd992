"""The routing decision: compiled VirtualService rules → one `RouteDecision` (Istio semantics).

Rules of every VirtualService that `Snapshot.routes_for(host, gateway)` returns are tried in that
order, first match wins (`match.route_match`). A host without any VirtualService gets the default
route to its own service (the mesh path) — or "no route" when there is no such service either.
The rules were compiled when the snapshot was built (`nodeagent.snapshot.routes`); what depends
on other documents — the service a destination host names, a DestinationRule's subset — is
looked up in the same snapshot here, a few dict reads per destination.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nodeagent.routing.match import (
    EVERYTHING,
    route_match,
    tcp_route_matches,
    tls_route_matches,
)
from nodeagent.routing.model import (
    Fault,
    HttpRequest,
    MatchedRule,
    Redirect,
    RouteDecision,
    RouteDestination,
    Source,
    TcpRequest,
    TcpRouteDecision,
    TlsRequest,
)
from nodeagent.snapshot import hosts
from nodeagent.snapshot.model import Service, VirtualService
from nodeagent.snapshot.routes import (
    Destination,
    FaultRule,
    HttpMatch,
    RedirectRule,
    Rewrite,
)
from nodeagent.snapshot.snapshot import Snapshot

Rand = Callable[[], float]  # uniform in [0, 1)


def resolve_destination(
    snapshot: Snapshot,
    dest: Destination,
    *,
    namespace: str,
    source: Source,
    request_port: int | None,
) -> RouteDestination:
    """A compiled Destination → service, subset labels and service port in this snapshot."""
    service = snapshot.service_by_host(dest.fqdn) or snapshot.resolve_host(dest.host, namespace)
    host = (
        service.hostname if service is not None and not hosts.is_wildcard(dest.fqdn) else dest.fqdn
    )
    port = dest.port
    if port is None and service is not None:
        if len(service.ports) == 1:
            port = service.ports[0].port
        elif request_port is not None and service.port(request_port) is not None:
            port = request_port
    elif port is None:
        port = request_port
    labels = None
    error = None
    if dest.subset:
        dr = snapshot.destination_rule(host, from_namespace=source.namespace or None)
        found = dr.subset(dest.subset) if dr is not None else None
        if found is None:
            error = "NC"  # Envoy: no cluster for an undefined subset
        else:
            labels = found.labels
    return RouteDestination(
        host=host,
        service=service,
        port=port,
        weight=dest.weight,
        subset=dest.subset,
        subset_labels=labels,
        request_headers=dest.headers.request,
        response_headers=dest.headers.response,
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


def _fault(rule: FaultRule | None, rand: Rand) -> Fault:
    if rule is None:
        return Fault()
    delay = 0.0
    abort: int | None = None
    abort_grpc: int | None = None
    if rule.delay is not None and rand() * 100 < rule.delay_percent:
        delay = rule.delay
    configured = rule.abort_status is not None or rule.abort_grpc_status is not None
    if configured and rand() * 100 < rule.abort_percent:
        abort, abort_grpc = rule.abort_status, rule.abort_grpc_status
    return Fault(delay=delay, abort_status=abort, abort_grpc_status=abort_grpc)


def _rewrite_path(request: HttpRequest, rewrite: Rewrite | None, match: HttpMatch) -> str:
    """Envoy's rewrite: a prefix match replaces the matched prefix, other matches the whole path.

    One deviation from Envoy, as the issue asks: a rewrite ending in "/" joined to a remainder
    starting with "/" does not double the slash (`/my-app/x` with prefix `/my-app` → `/` gives
    `/x`, where Envoy would send `//x`).
    """
    target = request.target
    if rewrite is None:
        return target
    if rewrite.uri_regex is not None:
        assert rewrite.uri_regex.regex is not None  # compiled with the route
        new_path = rewrite.uri_regex.regex.sub(rewrite.uri_regex_rewrite, request.path)
        return f"{new_path}?{request.query}" if request.query else new_path
    if rewrite.uri is None:
        return target
    new = rewrite.uri
    uri = match.uri
    if uri is None or uri.kind in ("prefix", "present"):
        prefix = uri.value if uri is not None and uri.kind == "prefix" else "/"
        rest = target[len(prefix) :]
        if new.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        out = new + rest
        return out if out.startswith("/") else "/" + out
    return f"{new}?{request.query}" if request.query else new


def _redirect(request: HttpRequest, rule: RedirectRule) -> Redirect:
    scheme = rule.scheme or request.scheme
    authority = rule.authority or request.authority
    port = request.port if rule.port_from_request else rule.port
    if port is not None:
        host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
        default = {"http": 80, "https": 443}.get(scheme)
        authority = host if port == default else f"{host}:{port}"
    uri = rule.uri
    path = (
        request.target
        if uri is None
        else (uri if "?" in uri or not request.query else f"{uri}?{request.query}")
    )
    return Redirect(status=rule.status, location=f"{scheme}://{authority}{path}")


def _decision_for_rule(
    snapshot: Snapshot,
    source: Source,
    request: HttpRequest,
    matched: MatchedRule,
    rand: Rand,
) -> RouteDecision:
    """The RouteDecision for a rule that matched."""
    route = matched.route
    if route.redirect is not None:
        return RouteDecision(
            kind="redirect",
            route_name=route.route_name,
            redirect=_redirect(request, route.redirect),
            response_headers=route.headers.response,
            matched=matched,
        )
    if route.direct_response is not None:
        return RouteDecision(
            kind="direct",
            route_name=route.route_name,
            direct=route.direct_response,
            response_headers=route.headers.response,
            matched=matched,
        )
    namespace = matched.virtual_service.namespace
    request_port = request.port if source.gateway == hosts.MESH_GATEWAY else None
    destinations = tuple(
        resolve_destination(
            snapshot, d, namespace=namespace, source=source, request_port=request_port
        )
        for d in route.destinations
    )
    chosen = _pick(destinations, rand)
    fault = _fault(route.fault, rand)
    mirror = None
    if route.mirror is not None and rand() * 100 < route.mirror.percent:
        mirror = resolve_destination(
            snapshot,
            route.mirror.destination,
            namespace=namespace,
            source=source,
            request_port=request.port,
        )
    request_headers = route.headers.request
    response_headers = route.headers.response
    if chosen is not None:
        request_headers = request_headers.then(chosen.request_headers)
        response_headers = response_headers.then(chosen.response_headers)
    rewrite = route.rewrite
    authority = (rewrite.authority if rewrite is not None else None) or request.authority
    return RouteDecision(
        kind="route",
        route_name=route.route_name,
        destinations=destinations,
        chosen=chosen,
        path=_rewrite_path(request, rewrite, matched.match or EVERYTHING),
        authority=authority,
        request_headers=request_headers,
        response_headers=response_headers,
        timeout=route.timeout,
        retries=route.retries,
        fault=fault,
        mirror=mirror,
        matched=matched,
    )


def _routing_host(
    snapshot: Snapshot, source: Source, request: HttpRequest
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


def find_rule(
    virtual_services: tuple[VirtualService, ...], request: HttpRequest, source: Source
) -> MatchedRule | None:
    """The first rule (in `routes_for` order) one of whose match entries the request meets."""
    for vs in virtual_services:
        for index, route in enumerate(vs.http):
            m = route_match(route, request, source)
            if m is not None:
                return MatchedRule(vs, index, route, m if route.matches else None)
    return None


def route_http(
    snapshot: Snapshot,
    source: Source,
    request: HttpRequest,
    *,
    rand: Rand | None = None,
) -> RouteDecision:
    """Route one HTTP request. `rand` (uniform [0,1)) drives weights, fault and mirror sampling."""
    if rand is None:
        rand = random.random
    if source.require_tls:
        # Envoy's `require_tls: ALL` virtual host: https on the default port, before any route.
        location = f"https://{request.authority_host}{request.target}"
        return RouteDecision(kind="redirect", route_name="", redirect=Redirect(301, location))
    host, service = _routing_host(snapshot, source, request)
    virtual_services = snapshot.routes_for(host, source.gateway)
    matched = find_rule(virtual_services, request, source)
    if matched is not None:
        return _decision_for_rule(snapshot, source, request, matched, rand)
    if virtual_services or service is None or source.gateway != hosts.MESH_GATEWAY:
        return RouteDecision(kind="no_route", route_name="")
    dest = RouteDestination(
        host=service.hostname,
        service=service,
        port=request.port if service.port(request.port) is not None else _single_port(service),
    )
    return RouteDecision(
        kind="route",
        route_name="default",
        destinations=(dest,),
        chosen=dest,
        path=request.target,
        authority=request.authority,
    )


def _single_port(service: Service) -> int | None:
    return service.ports[0].port if len(service.ports) == 1 else None


def route_tls(
    snapshot: Snapshot,
    source: Source,
    request: TlsRequest,
    *,
    rand: Rand | None = None,
) -> TcpRouteDecision:
    """Route one TLS connection that is passed through (not terminated) by the `tls` rules of
    the VirtualServices for its SNI. No matching rule: no route (Envoy closes the connection),
    never a default: the SNI names no service by itself."""
    if rand is None:
        rand = random.random
    for vs in snapshot.routes_for(request.sni, source.gateway):
        for route in vs.tls:
            if not tls_route_matches(route, request, source):
                continue
            destinations = tuple(
                resolve_destination(
                    snapshot, d, namespace=vs.namespace, source=source, request_port=request.port
                )
                for d in route.destinations
            )
            return TcpRouteDecision(
                route.route_name, destinations=destinations, chosen=_pick(destinations, rand)
            )
    return TcpRouteDecision(route_name="")


def route_tcp(
    snapshot: Snapshot,
    source: Source,
    request: TcpRequest,
    *,
    rand: Rand | None = None,
) -> TcpRouteDecision:
    """Route one TCP connection by the VirtualServices' `tcp` rules (weights, no L7 matches).

    No VirtualService with a matching tcp rule: the default route to the addressed service.
    """
    if rand is None:
        rand = random.random
    host = hosts.normalize(request.host)
    for vs in snapshot.routes_for(host, source.gateway):
        for route in vs.tcp:
            if not tcp_route_matches(route, request, source):
                continue
            destinations = tuple(
                resolve_destination(
                    snapshot, d, namespace=vs.namespace, source=source, request_port=request.port
                )
                for d in route.destinations
            )
            chosen = _pick(destinations, rand)
            return TcpRouteDecision(route.route_name, destinations=destinations, chosen=chosen)
    service = snapshot.service_by_host(host)
    if service is None:
        return TcpRouteDecision(route_name="")
    dest = RouteDestination(
        host=service.hostname,
        service=service,
        port=request.port if service.port(request.port) is not None else _single_port(service),
    )
    return TcpRouteDecision(route_name="default", destinations=(dest,), chosen=dest)
