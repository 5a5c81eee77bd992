"""`explain(snapshot, ...)`: the pure walk through the agent's own decisions, in the order the data
path takes them (DNS name → service port → HTTP or TCP route → destinations → endpoints), for a
pod or for the ingress gateway; returns the JSON-able report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nodeagent.authn import RequestAuth
from nodeagent.authn.authenticator import request_auth
from nodeagent.authz import Connection
from nodeagent.balance import Registry
from nodeagent.dns.message import name_from_text
from nodeagent.dns.resolve import find_service
from nodeagent.gateway.servers import host_matches, server_for_sni, servers_by_port
from nodeagent.meshctl.explain.describe import (
    destination_doc,
    endpoint_doc,
    fault_doc,
    headers_doc,
    mirror_doc,
    port_doc,
    retries_doc,
    rewrite_doc,
    rule_doc,
    service_doc,
)
from nodeagent.meshctl.explain.inputs import (
    Caller,
    ExplainError,
    Target,
    find_caller,
    parse_headers,
    parse_target,
)
from nodeagent.meshctl.explain.l7 import HttpView, add_http_checks, http_checks
from nodeagent.proxy import outbound
from nodeagent.routing import HttpRequest, Source, TcpRequest, route_http, route_tcp
from nodeagent.routing.model import RouteDecision
from nodeagent.snapshot import Endpoint, L7Protocol, ServiceTarget, Snapshot, Workload, hosts


def _http(
    snap: Snapshot,
    caller: Caller,
    source: Source,
    request: HttpRequest,
    report: dict[str, Any],
    auth: RequestAuth,
) -> None:
    routing_host = request.host or request.authority_host
    if request.host is None and source.gateway == hosts.MESH_GATEWAY:
        svc = snap.resolve_host(routing_host, source.namespace)
        routing_host = svc.hostname if svc else routing_host
    considered = [vs.ref for vs in snap.routes_for(hosts.normalize(routing_host), source.gateway)]
    # Weights, faults and mirrors are random: the report lists every destination with its
    # weight and the configured percentages, so one fixed draw is enough for the rest.
    decision: RouteDecision = route_http(snap, source, request, rand=lambda: 0.0)
    matched = decision.matched
    report["virtual_services_considered"] = considered
    report["route"] = {
        "kind": decision.kind,
        "route_name": decision.route_name,
        "rule": rule_doc(matched) if matched is not None else None,
        "default": decision.route_name == "default",
    }
    if decision.kind == "no_route":
        report["outcome"] = "no_route"
        why = (
            f"no rule of {', '.join(considered)} matches"
            if considered
            else f"no VirtualService or service for host {routing_host}"
        )
        report["summary"] = f"no route (404 NR): {why}"
        return
    route = report["route"]
    if decision.kind == "redirect" and decision.redirect is not None:
        route["redirect"] = {
            "status": decision.redirect.status,
            "location": decision.redirect.location,
        }
        report["outcome"] = "redirect"
        report["summary"] = f"redirect {decision.redirect.status} to {decision.redirect.location}"
        return
    if decision.kind == "direct" and decision.direct is not None:
        route["direct_response"] = {
            "status": decision.direct.status,
            "body": decision.direct.body.decode("utf-8", "replace"),
        }
        report["outcome"] = "direct"
        report["summary"] = f"answered by the proxy: {decision.direct.status}"
        return
    rule = matched.route if matched is not None else None
    route.update(
        rewrite=rewrite_doc(rule.rewrite) if rule is not None else None,
        upstream_path=decision.path,
        upstream_authority=decision.authority,
        timeout=decision.timeout,
        retries=retries_doc(decision.retries, rule is not None and rule.retries_configured),
        fault=fault_doc(rule.fault) if rule is not None else None,
        mirror=mirror_doc(rule.mirror) if rule is not None else None,
        request_headers=headers_doc(rule.headers) if rule is not None else None,
    )
    req = report["request"]
    view = HttpView(
        method=req["method"] or "GET",
        authority=decision.authority or req["authority"],
        path=decision.path or (req["path"] + (f"?{req['query']}" if req["query"] else "")),
        headers=tuple(req["headers"].items()),
        auth=auth,
    )
    report["destinations"] = [destination_doc(snap, d, caller) for d in decision.destinations]
    add_http_checks(snap, report["destinations"], caller, view)
    report["outcome"] = "route"
    report["summary"] = _route_summary(decision.route_name, report["destinations"])


def end_user(principal: str | None, claims: Sequence[str]) -> RequestAuth:
    """The end user `--jwt-principal ISS/SUB` and `--jwt-claim NAME=VALUE` describe, as if a
    token with those claims had verified (a repeated claim is a list)."""
    if principal is None:
        if claims:
            raise ExplainError("--jwt-claim needs --jwt-principal (the token's iss/sub)")
        return RequestAuth.empty()
    iss, sep, sub = principal.rpartition("/")
    if not sep or not iss or not sub:
        raise ExplainError(f"--jwt-principal {principal!r}: expected ISSUER/SUBJECT")
    payload: dict[str, Any] = {"iss": iss, "sub": sub}
    for item in claims:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ExplainError(f"--jwt-claim {item!r}: expected NAME=VALUE")
        if name in payload and name not in ("iss", "sub"):
            previous = payload[name]
            payload[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            payload[name] = value
    return request_auth(payload)


def _route_summary(name: str, dests: list[dict[str, Any]]) -> str:
    parts = []
    for d in dests:
        subset = f" subset {d['subset']}" if d["subset"] else ""
        parts.append(f"{d['weight']}% to {d['host']}:{d['port']}{subset}")
    return f"routed by {name}: " + ", ".join(parts)


def _tcp(
    snap: Snapshot,
    caller: Caller,
    source: Source,
    target: ServiceTarget,
    vip: str,
    report: dict[str, Any],
) -> None:
    l4 = outbound.outbound_decision(snap, vip, target.port.port, registry=Registry(on_event=None))
    if isinstance(l4, outbound.Passthrough):
        report["outcome"] = "passthrough"
        report["passthrough"] = {"address": l4.address, "port": l4.port, "reason": l4.reason}
        report["summary"] = f"passed through to {l4.address}:{l4.port} ({l4.reason})"
        return
    if isinstance(l4, outbound.Refuse):
        report["outcome"] = "refused"
        report["summary"] = f"refused: {l4.reason}"
        return
    decision = route_tcp(
        snap,
        source,
        TcpRequest(target.service.hostname, target.port.port, vip),
        rand=lambda: 0.0,
    )
    report["tcp_route"] = {"route_name": decision.route_name}
    report["destinations"] = [destination_doc(snap, d, caller) for d in decision.destinations]
    report["outcome"] = "route"
    report["summary"] = _route_summary(decision.route_name, report["destinations"])


def _direct_workload(
    snap: Snapshot, caller: Caller, wl: Workload, ip: str, port: int, report: dict[str, Any]
) -> None:
    """A pod IP (headless services end up here): no routing, straight through the tunnel."""
    ep = Endpoint(ip, port, wl, wl.labels)
    report["outcome"] = "workload"
    report["destinations"] = [
        {
            "host": ip,
            "service": None,
            "service_kind": None,
            "port": port,
            "weight": 100,
            "subset": None,
            "subset_labels": None,
            "cluster": f"pod {wl.ref}",
            "error": None,
            "endpoints": [endpoint_doc(snap, ep, caller)],
        }
    ]
    report["summary"] = f"direct to pod {wl.ref} ({ip}:{port}), no service routing"


def explain(
    snap: Snapshot,
    *,
    source: str,
    url: str,
    headers: Sequence[str] = (),
    method: str = "GET",
    namespace: str = "default",
    jwt_principal: str | None = None,
    jwt_claims: Sequence[str] = (),
) -> dict[str, Any]:
    """The report for one request from `source` to `url`. Raises ExplainError on bad input."""
    target = parse_target(url)
    auth = end_user(jwt_principal, jwt_claims)
    header_map = parse_headers(headers)
    caller = find_caller(snap, source, namespace)
    method = method.upper()
    if not method.isalpha():
        raise ExplainError(f"-X {method!r}: not an HTTP method")
    authority = header_map.get("host", target.authority)
    report: dict[str, Any] = {
        "revision": snap.revision,
        "source": {
            "kind": caller.kind,
            "ref": caller.ref,
            "namespace": caller.namespace,
            "labels": dict(caller.labels),
            "ip": caller.ip,
            "node": caller.node,
            "identity": caller.identity,
            "principal": caller.principal,
            "assumed": caller.assumed,
        },
        "request": {
            "url": url,
            "scheme": target.scheme,
            "method": method if target.scheme == "http" else None,
            "authority": authority,
            "path": target.path,
            "query": target.query,
            "headers": header_map,
        },
        "resolved": None,
        "protocol": None,
        "outcome": None,
        "summary": "",
        "route": None,
        "tcp_route": None,
        "destinations": [],
        "passthrough": None,
    }
    if caller.kind == "gateway":
        _from_gateway(snap, caller, target, method, authority, header_map, report, auth)
        return report
    src = Source(namespace=caller.namespace, labels=caller.labels)
    if target.is_ip:
        vip = target.host
        report["resolved"] = {"via": "ip", "address": vip, "port": target.port}
    else:
        resolved_vip = _resolve_name(snap, caller, target, report)
        if resolved_vip is None:
            return report
        vip = resolved_vip
    found = snap.find_address(vip, target.port)
    if isinstance(found, Workload):
        report["resolved"]["workload"] = found.ref
        report["protocol"] = "tcp"
        _direct_workload(snap, caller, found, vip, target.port, report)
        return report
    if found is None:
        _unknown(snap, vip, target.port, report)
        return report
    report["resolved"].update(service=service_doc(found.service), **port_doc(found.port))
    # The proxy's own L7 dispatch rule, so explain cannot drift from what the proxy does.
    l7_target = outbound.l7_target(snap, vip, target.port)
    l7 = l7_target is not None and l7_target.port.l7_protocol is not L7Protocol.SNIFF
    if l7_target is not None and not l7:
        report["note"] = (
            "the port's protocol is not declared: the proxy sniffs the client's first bytes "
            "(HTTP/1.x or an HTTP/2 preface: routed as below; anything else: TCP)"
        )
    if l7_target is not None and target.scheme in ("http", "grpc"):
        report["protocol"] = target.scheme
        if target.scheme == "grpc":
            # What a gRPC client sends: POST with the gRPC content type (routes may match it).
            method = "POST"
            header_map.setdefault("content-type", "application/grpc")
            header_map.setdefault("te", "trailers")
            report["request"]["method"] = method
            if l7_target.port.l7_protocol is L7Protocol.HTTP1:
                report["note"] = (
                    "the port is declared HTTP/1.1 (name http…): a gRPC client's HTTP/2 would "
                    "be refused; name it grpc-… or set appProtocol: grpc"
                )
        request = HttpRequest.from_target(
            method,
            authority,
            target.path + (f"?{target.query}" if target.query else ""),
            header_map,
            port=target.port,
            host=found.service.hostname,
        )
        l4 = outbound.outbound_decision(snap, vip, target.port, registry=Registry(on_event=None))
        # The whole service passed through (no endpoint picked: a ServiceEntry without
        # endpoints); one picked endpoint outside the mesh (handle set) is still routed at L7.
        if isinstance(l4, outbound.Passthrough) and l4.handle is None:
            _tcp(snap, caller, src, found, vip, report)
            return report
        _http(snap, caller, src, request, report, auth)
    else:
        report["protocol"] = "tcp"
        if l7:
            report["note"] = "the port is HTTP: the proxy parses HTTP whatever the URL scheme"
        _tcp(snap, caller, src, found, vip, report)
    return report


def _resolve_name(
    snap: Snapshot, caller: Caller, target: Target, report: dict[str, Any]
) -> str | None:
    """The address the pod's DNS gives for the URL's host (the mesh's DNS proxy answers)."""
    try:
        name = name_from_text(target.host)
    except (ValueError, UnicodeError) as exc:
        raise ExplainError(f"--to {target.url!r}: bad host name ({exc})") from None
    match = find_service(snap, caller.namespace, name)
    if match is None:
        raise ExplainError(
            f"--to {target.url!r}: unknown host {target.host} (not a mesh service as seen from "
            f"namespace {caller.namespace}; the pod's DNS would forward it upstream)"
        )
    service = match.service
    resolved: dict[str, Any] = {"via": "dns", "name": target.host, "dns_host": match.host}
    report["resolved"] = resolved
    if service.addresses:
        resolved["address"] = service.addresses[0]
        resolved["port"] = target.port
        return service.addresses[0]
    # Headless (or no VIP yet): DNS answers the pods' IPs; the client dials one of them.
    addresses = snap.dns_addresses(service)
    resolved.update(service=service_doc(service), address=None, port=target.port)
    if not addresses:
        report["outcome"] = "no_endpoints"
        report["summary"] = f"{service.ref} has no VIP and no pods: DNS answers no address"
        return None
    report["protocol"] = "tcp"
    report["outcome"] = "workload"
    for ip in addresses:
        wl = snap.workload_by_ip(ip)
        if wl is None:
            continue
        ep = Endpoint(ip, target.port, wl, wl.labels)
        report["destinations"].append(
            {
                "host": ip,
                "service": service.ref,
                "service_kind": service.kind,
                "port": target.port,
                "weight": None,
                "subset": None,
                "subset_labels": None,
                "cluster": f"pod {wl.ref}",
                "error": None,
                "endpoints": [endpoint_doc(snap, ep, caller)],
            }
        )
    report["summary"] = (
        f"headless {service.ref}: DNS answers {len(addresses)} pod IP(s); the client dials one "
        "directly (no service routing)"
    )
    return None


def _unknown(snap: Snapshot, ip: str, port: int, report: dict[str, Any]) -> None:
    registry = Registry(on_event=None)
    allow = outbound.outbound_decision(snap, ip, port, registry=registry, policy="ALLOW_ANY")
    strict = outbound.outbound_decision(snap, ip, port, registry=registry, policy="REGISTRY_ONLY")
    allow_reason = allow.reason if isinstance(allow, outbound.Passthrough) else str(allow)
    strict_reason = strict.reason if isinstance(strict, outbound.Refuse) else str(strict)
    report["outcome"] = "unknown"
    report["passthrough"] = {
        "address": ip,
        "port": port,
        "reason": allow_reason,
        "registry_only": strict_reason,
    }
    report["summary"] = (
        f"unknown destination {ip}:{port}: passed through in plaintext (ALLOW_ANY); "
        "refused under REGISTRY_ONLY"
    )


def _from_gateway(
    snap: Snapshot,
    caller: Caller,
    target: Target,
    method: str,
    authority: str,
    header_map: dict[str, str],
    report: dict[str, Any],
    auth: RequestAuth,
) -> None:
    """The ingress gateway's path: server by port and Host (https: by SNI, the URL's host, as
    the gateway picks it: `gateway.servers`), then its bound VirtualServices."""
    report["protocol"] = "http"
    if target.scheme not in ("http", "https"):
        raise ExplainError(f"--to {target.url!r}: the gateway serves http:// and https:// URLs")
    host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    servers = servers_by_port(snap, caller.labels).get(target.port, ())
    if target.scheme == "https":
        server = server_for_sni(servers, target.host)
        if server is not None and not any(host_matches(h, host) for h in server.hosts):
            server = None  # the Host names another server than the SNI's: 404, as Envoy
    else:
        plain = tuple(s for s in servers if s.tls is None)
        server = next((s for s in plain if any(host_matches(h, host) for h in s.hosts)), None)
    report["resolved"] = {
        "via": "gateway",
        "gateway": server.gateway if server else None,
        "server_hosts": list(server.hosts) if server else None,
        "tls": server.tls.mode if server is not None and server.tls is not None else None,
        "port": target.port,
        "host": host,
    }
    if server is None:
        report["outcome"] = "no_route"
        report["summary"] = (
            f"no route (404 NR): no {target.scheme.upper()} Gateway server selecting "
            f"{caller.ref} serves port {target.port} for host {host}"
        )
        return
    if server.passthrough:
        report["outcome"] = "passthrough"
        report["summary"] = (
            f"TLS passed through by SNI {target.host} (not terminated at the gateway): "
            "VirtualService tls routes decide the destination"
        )
        return
    source = Source(
        namespace=server.namespace,
        labels=caller.labels,
        gateway=server.gateway,
        require_tls=server.https_redirect,
    )
    request = HttpRequest.from_target(
        method,
        authority,
        target.path + (f"?{target.query}" if target.query else ""),
        header_map,
        port=target.port,
        host=None,
        scheme=target.scheme,
    )
    _http(snap, caller, source, request, report, auth)
    _gateway_checks(snap, caller, target, report, auth)


def _gateway_checks(
    snap: Snapshot, caller: Caller, target: Target, report: dict[str, Any], auth: RequestAuth
) -> None:
    """The gateway's own RequestAuthentication and AuthorizationPolicies (JWT at the edge),
    for a client from outside the mesh: no identity, address unknown."""
    namespace, _, name = caller.ref.partition("/")
    gateway = Workload(
        uid="",
        name=name,
        namespace=namespace,
        node=caller.node or "",
        addresses=(caller.ip,) if caller.ip else (),
        labels=caller.labels,
        annotations={},
        service_account=caller.identity.rpartition("/")[2],
        identity=caller.identity,
    )
    req = report["request"]
    view = HttpView(
        method=req["method"] or "GET",
        authority=req["authority"],
        path=req["path"] + (f"?{req['query']}" if req["query"] else ""),
        headers=tuple(req["headers"].items()),
        auth=auth,
    )
    conn = Connection("0.0.0.0", caller.ip or "0.0.0.0", target.port, None)
    authorization, jwt = http_checks(snap, gateway, conn, view, "gateway")
    report["gateway_checks"] = {"authorization": authorization, "jwt": jwt}
    if authorization["decision"] == "DENY":
        by = f" by {authorization['policy']}" if authorization["policy"] else ""
        report["outcome"] = "denied"
        report["summary"] = f"denied at the gateway (403 RBAC: access denied){by}"
