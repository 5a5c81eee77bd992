"""Matching: does a request (or a TCP connection) meet a compiled route's conditions?

Istio/Envoy semantics over the typed routes of `nodeagent.snapshot.routes`: a rule's `match`
list is OR, the conditions inside one entry are AND, a rule without `match` matches everything.
Regexes are RE2 (compiled when the snapshot was built) and must match the whole string. Exact
and regex uri matches see the path without the query string; a prefix sees the whole `:path`
(as Envoy). Pure functions, no state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from nodeagent.routing.model import HttpRequest, Source, TcpRequest, TlsRequest
from nodeagent.snapshot import hosts
from nodeagent.snapshot.routes import HttpMatch, HttpRoute, StringMatch, TcpMatch, TcpRoute

EVERYTHING = HttpMatch()  # what a rule without `match` entries matches with


def string_matches(m: StringMatch, value: str) -> bool:
    """Istio StringMatch: exact, prefix or full-string RE2 regex; "present" matches anything."""
    kind = m.kind
    if kind == "exact":
        return value.lower() == m.value.lower() if m.ignore_case else value == m.value
    if kind == "prefix":
        if m.ignore_case:
            return value.lower().startswith(m.value.lower())
        return value.startswith(m.value)
    if kind == "regex":
        assert m.regex is not None  # compiled with the route
        return m.regex.fullmatch(value) is not None
    return True


def _pseudo_header(request: HttpRequest, name: str) -> str | None:
    # Envoy lets header matches name pseudo-headers; Istio's docs use `:authority`/`:method`.
    if name == ":authority":
        return request.authority
    if name == ":method":
        return request.method
    if name == ":path":
        return request.target
    if name == ":scheme":
        return request.scheme
    return None


def _header_matches(headers: Mapping[str, str], name: str, m: StringMatch) -> bool:
    value = headers.get(name)
    return value is not None and string_matches(m, value)


def source_matches(
    source: Source,
    labels: Mapping[str, str] | None,
    namespace: str | None,
    gateways: frozenset[str] | None,
) -> bool:
    """The L4 conditions HTTP and TCP matches share: sourceLabels, sourceNamespace, gateways."""
    if labels and not hosts.labels_match(labels, source.labels):
        return False
    if namespace is not None and namespace != source.namespace:
        return False
    return gateways is None or source.gateway in gateways


def request_matches(m: HttpMatch, request: HttpRequest, source: Source) -> bool:
    """Whether one HTTPMatchRequest entry matches (every condition present must hold)."""
    if (uri := m.uri) is not None:
        value = request.target if uri.kind == "prefix" else request.path
        if not string_matches(uri, value):
            return False
    if m.scheme is not None and not string_matches(m.scheme, request.scheme):
        return False
    if m.method is not None and not string_matches(m.method, request.method):
        return False
    if m.authority is not None and not string_matches(m.authority, request.authority):
        return False
    for name, hm in m.headers:
        pseudo = _pseudo_header(request, name) if name.startswith(":") else None
        if pseudo is not None:
            if not string_matches(hm, pseudo):
                return False
        elif not _header_matches(request.headers, name, hm):
            return False
    for name, hm in m.without_headers:
        if _header_matches(request.headers, name, hm):
            return False
    if m.query_params:
        params = request.query_params()
        for name, qm in m.query_params:
            param = params.get(name)
            if param is None or not string_matches(qm, param):
                return False
    if m.port is not None and m.port != request.port:
        return False
    return source_matches(source, m.source_labels, m.source_namespace, m.gateways)


def route_match(route: HttpRoute, request: HttpRequest, source: Source) -> HttpMatch | None:
    """The first entry of the rule's `match` list that matches (`EVERYTHING` for a rule
    without entries), else None."""
    if not route.matches:
        return EVERYTHING
    for m in route.matches:
        if request_matches(m, request, source):
            return m
    return None


def _subnet_matches(m: TcpMatch, ip: str | None) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in m.destination_subnets)


def tls_route_matches(route: TcpRoute, request: TlsRequest, source: Source) -> bool:
    """Whether any of a `tls` rule's match entries holds: the SNI among its sniHosts (exact or
    `*.suffix`), the port, the source conditions (Istio's TLSMatchAttributes)."""
    sni = request.sni.lower().rstrip(".")
    for m in route.matches:
        if m.port is not None and m.port != request.port:
            continue
        if not any(
            h == "*" or h == sni or (h.startswith("*.") and sni.endswith(h[1:]))
            for h in m.sni_hosts
        ):
            continue
        if source_matches(source, m.source_labels, m.source_namespace, m.gateways):
            return True
    return False


def tcp_route_matches(route: TcpRoute, request: TcpRequest, source: Source) -> bool:
    """Whether any of a tcp rule's L4 match entries holds (a rule without entries: always)."""
    if not route.matches:
        return True
    for m in route.matches:
        if m.port is not None and m.port != request.port:
            continue
        if m.destination_subnets and not _subnet_matches(m, request.destination_ip):
            continue
        if source_matches(source, m.source_labels, m.source_namespace, m.gateways):
            return True
    return False
