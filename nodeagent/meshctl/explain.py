"""`meshctl explain`: what the mesh would do with one request, computed from the live config.

One snapshot is built from the store with the agent's own builder, then the agent's own pure
decisions are asked, in the order the data path asks them: the pod's DNS (`nodeagent.dns.resolve`)
turns the URL's host into a service, `find_address` gives the service port and its protocol,
`routing.decide` (HTTP) or `routing.decide_tcp` (TCP) picks the VirtualService rule and its
weighted destinations, `snapshot.endpoints` lists each destination's endpoints, and for each
endpoint's workload `peer_authentication_for` and `proxy.inbound.tunnel_decision` give the mTLS
mode and the authorization verdict. Nothing here re-implements a decision: when explain and the
proxy disagree, the bug is in the shared code, not in two copies.

`explain(snapshot, ...)` is pure and returns a JSON-able report (dict); `render(report)` prints
it for people; `run(args, out, err)` is the subcommand (store I/O, exit status).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

from nodeagent.dns.message import name_from_text
from nodeagent.dns.resolve import find_service
from nodeagent.gateway.server import DEFAULT_LABELS, host_matches, servers_by_port
from nodeagent.proxy import outbound
from nodeagent.proxy.inbound import plaintext_decision, tunnel_decision
from nodeagent.routing import Request, RouteDestination, Source, TcpRequest, decide, decide_tcp
from nodeagent.routing.decide import match_request
from nodeagent.routing.model import DEFAULT_RETRIES, Decision, RetryPolicy
from nodeagent.snapshot import (
    Endpoint,
    Service,
    ServicePort,
    ServiceTarget,
    Snapshot,
    SnapshotBuilder,
    Workload,
    hosts,
)
from nodeagent.store import DEFAULT_URL, ENV_VAR, StoreError, open_store

PREFIX = "/mesh/v1/"
GATEWAY_SOURCE = "gateway"
GATEWAY_WORKLOAD = ("istio-system", "istio-ingressgateway")
# Istio's default service account of the ingress gateway, used when no gateway workload is
# registered (the identity the gateway would present).
GATEWAY_SERVICE_ACCOUNT = "istio-ingressgateway-service-account"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_HEADERS = 100


class ExplainError(Exception):
    """Bad input (unknown pod, unparsable URL, unknown host): one line for the operator."""


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The parsed `--to` URL."""

    url: str
    scheme: str  # http, https or tcp
    host: str  # lower case, no brackets
    port: int
    authority: str  # host[:port] as the client sends it in Host
    path: str
    query: str

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_target(url: str) -> Target:
    """`http://host[:port]/path?q`, `tcp://host:port`, `https://…`; no scheme means http."""
    text = url.strip()
    if not text:
        raise ExplainError("--to: empty URL")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ExplainError(f"--to {url!r}: not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "tcp"):
        raise ExplainError(f"--to {url!r}: scheme {scheme!r} is not one of http, https, tcp")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise ExplainError(f"--to {url!r}: no host")
    if port is None:
        if scheme == "tcp":
            raise ExplainError(f"--to {url!r}: a tcp:// URL needs a port")
        port = _DEFAULT_PORTS[scheme]
    if port == 0:
        raise ExplainError(f"--to {url!r}: port 0 is not a destination")
    netloc = parts.netloc.rpartition("@")[2]
    return Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        authority=netloc.lower(),
        path=parts.path or "/",
        query=parts.query,
    )


def parse_headers(items: Sequence[str]) -> dict[str, str]:
    """`-H 'Name: value'` → lower-case names; repeated headers joined with ", " (as routing)."""
    if len(items) > _MAX_HEADERS:
        raise ExplainError(f"-H: {len(items)} headers (at most {_MAX_HEADERS})")
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or not name or any(c.isspace() for c in name):
            raise ExplainError(f"-H {item!r}: expected 'Name: value'")
        value = value.strip()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


# -- the source --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Caller:
    kind: str  # "workload" or "gateway"
    ref: str
    namespace: str
    labels: Mapping[str, str]
    ip: str | None
    node: str | None
    identity: str
    assumed: bool  # the gateway is not a registered workload: labels and identity are defaults

    @property
    def principal(self) -> str:
        return self.identity.removeprefix("spiffe://")


def _find_workload(snap: Snapshot, namespace: str, name: str) -> Workload | None:
    found = sorted(
        (w for w in snap.workloads() if w.namespace == namespace and w.name == name),
        key=lambda w: w.uid,
    )
    return found[0] if found else None


def _caller(snap: Snapshot, source: str, default_namespace: str) -> _Caller:
    if source == GATEWAY_SOURCE:
        wl = _find_workload(snap, *GATEWAY_WORKLOAD)
        ref = "/".join(GATEWAY_WORKLOAD)
        if wl is not None:
            labels = wl.labels if wl.labels else DEFAULT_LABELS
            return _Caller(
                "gateway", ref, wl.namespace, labels, wl.address, wl.node, wl.identity, False
            )
        identity = (
            f"spiffe://{snap.trust_domain}/ns/{GATEWAY_WORKLOAD[0]}/sa/{GATEWAY_SERVICE_ACCOUNT}"
        )
        return _Caller(
            "gateway", ref, GATEWAY_WORKLOAD[0], DEFAULT_LABELS, None, None, identity, True
        )
    namespace, _, name = source.rpartition("/")
    namespace = namespace or default_namespace
    if not name or "/" in namespace:
        raise ExplainError(f"--from {source!r}: expected [namespace/]name or 'gateway'")
    wl = _find_workload(snap, namespace, name)
    if wl is None:
        raise ExplainError(
            f"--from {source!r}: no workload {namespace}/{name} in the store "
            f"(revision {snap.revision})"
        )
    return _Caller(
        "workload", wl.ref, wl.namespace, wl.labels, wl.address, wl.node, wl.identity, False
    )


# -- the report --------------------------------------------------------------------------------


def _service_doc(service: Service) -> dict[str, Any]:
    return {
        "kind": service.kind,
        "ref": service.ref,
        "host": service.hostname,
        "addresses": list(service.addresses),
        "headless": service.headless,
    }


def _port_doc(port: ServicePort) -> dict[str, Any]:
    return {
        "port": port.port,
        "port_name": port.name,
        "protocol": port.protocol_hint,
        "target_port": port.target_port,
    }


def _endpoint_doc(snap: Snapshot, ep: Endpoint, caller: _Caller) -> dict[str, Any]:
    wl = ep.workload
    doc: dict[str, Any] = {
        "pod": wl.ref if wl else None,
        "ip": ep.address,
        "port": ep.port,
        "node": wl.node if wl else None,
        "identity": wl.identity if wl else None,
        "labels": dict(ep.labels),
    }
    if wl is None or not wl.identity:
        # outbound.decide: an endpoint outside the mesh is reached directly, in plaintext.
        doc.update(tunnel=False, mtls_mode=None, authorization=None)
        doc["note"] = "outside the mesh: passed through in plaintext"
        return doc
    mode = snap.peer_authentication_for(wl, ep.port)
    src_ip = caller.ip or "0.0.0.0"
    if caller.identity:
        verdict = tunnel_decision(snap, wl, src_ip, ep.address, ep.port, caller.identity)
    else:  # a caller without identity could only arrive on 15006
        verdict = plaintext_decision(snap, wl, src_ip, ep.address, ep.port)
    doc.update(
        tunnel=bool(caller.identity),
        mtls_mode=mode,
        authorization={
            "decision": "ALLOW" if verdict.allowed else "DENY",
            "policy": verdict.policy,
            "reason": verdict.reason,
            "audited": list(verdict.audited),
        },
    )
    return doc


def _destination_doc(snap: Snapshot, dest: RouteDestination, caller: _Caller) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "host": dest.host,
        "service": dest.service.ref if dest.service else None,
        "service_kind": dest.service.kind if dest.service else None,
        "port": dest.port,
        "weight": dest.weight,
        "subset": dest.subset,
        "subset_labels": dict(dest.subset_labels) if dest.subset_labels is not None else None,
        "cluster": dest.name,
        "error": None,
        "endpoints": [],
    }
    if dest.error == "NC":
        doc["error"] = f"subset {dest.subset} is not defined by any DestinationRule (503 NC)"
        return doc
    if dest.service is None:
        doc["error"] = f"host {dest.host} is not a known service (503 UH)"
        return doc
    if dest.port is None:
        doc["error"] = f"no port: {dest.service.ref} has several ports and none was named (503)"
        return doc
    endpoints = snap.endpoints(dest.service, dest.port, subset=dest.subset_labels)
    doc["endpoints"] = [_endpoint_doc(snap, ep, caller) for ep in endpoints]
    if not endpoints:
        doc["error"] = "no endpoints (503 UH)"
    return doc


def _retries_doc(policy: RetryPolicy, configured: bool) -> dict[str, Any]:
    return {
        "attempts": policy.attempts,
        "per_try_timeout": policy.per_try_timeout,
        "retry_on": sorted(policy.retry_on),
        "status_codes": sorted(policy.status_codes),
        "default": not configured and policy == DEFAULT_RETRIES,
    }


def _percent(doc: Mapping[str, Any], old_key: str = "percent") -> float:
    if (p := doc.get("percentage")) is not None:
        return float(p.get("value", 0.0))
    if (old := doc.get(old_key)) is not None:
        return float(old)
    return 100.0


def _fault_doc(rule: Mapping[str, Any]) -> dict[str, Any] | None:
    """The configured fault (with its percentages), not one sampled draw."""
    fault = rule.get("fault")
    if not fault:
        return None
    out: dict[str, Any] = {}
    if (d := fault.get("delay")) is not None:
        out["delay"] = {"fixed_delay": d.get("fixedDelay"), "percent": _percent(d)}
    if (a := fault.get("abort")) is not None:
        out["abort"] = {"http_status": a.get("httpStatus"), "percent": _percent(a)}
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def describe_match(clause: Mapping[str, Any]) -> list[str]:
    """Readable conditions of one HTTPMatchRequest, e.g. `uri prefix "/my-app"`."""
    out: list[str] = []

    def string(m: Mapping[str, Any]) -> str:
        for kind in ("exact", "prefix", "regex"):
            if m.get(kind) is not None:
                return f'{kind} "{m[kind]}"'
        return "present"

    for key in ("uri", "scheme", "method", "authority"):
        if (m := clause.get(key)) is not None:
            out.append(f"{key} {string(m)}")
    for key in ("headers", "withoutHeaders", "queryParams"):
        for name, m in (clause.get(key) or {}).items():
            out.append(f"{key}[{name}] {string(m)}")
    if clause.get("ignoreUriCase"):
        out.append("ignoreUriCase")
    if (port := clause.get("port")) is not None:
        out.append(f"port {port}")
    if labels := clause.get("sourceLabels"):
        out.append("sourceLabels " + ",".join(f"{k}={v}" for k, v in labels.items()))
    if (ns := clause.get("sourceNamespace")) is not None:
        out.append(f"sourceNamespace {ns}")
    if gateways := clause.get("gateways"):
        out.append("gateways " + ",".join(str(g) for g in gateways))
    return out


def _matched_rule(
    snap: Snapshot, source: Source, request: Request, host: str
) -> tuple[dict[str, Any] | None, Mapping[str, Any] | None, list[str]]:
    """Which VirtualService rule and match clause `decide` takes (the same walk, recorded)."""
    considered = []
    for vs in snap.routes_for(host, source.gateway):
        considered.append(vs.ref)
        for index, rule in enumerate(vs.http):
            matches = rule.get("match")
            if not matches:
                return _rule_doc(vs.ref, index, rule, None, None), rule, considered
            for ci, clause in enumerate(matches):
                if match_request(clause, request, source, vs.namespace):
                    return _rule_doc(vs.ref, index, rule, ci, clause), rule, considered
    return None, None, considered


def _rule_doc(
    vs: str, index: int, rule: Mapping[str, Any], ci: int | None, clause: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "virtual_service": vs,
        "rule_index": index,
        "rule_name": rule.get("name"),
        "match_index": ci,
        "match": _jsonable(clause) if clause is not None else None,
        "conditions": describe_match(clause) if clause is not None else [],
    }


def _http(
    snap: Snapshot,
    caller: _Caller,
    source: Source,
    request: Request,
    report: dict[str, Any],
) -> None:
    routing_host = request.host or request.authority_host
    if request.host is None and source.gateway == hosts.MESH_GATEWAY:
        svc = snap.resolve_host(routing_host, source.namespace)
        routing_host = svc.hostname if svc else routing_host
    rule_doc, rule, considered = _matched_rule(snap, source, request, hosts.normalize(routing_host))
    # Weights, faults and mirrors are random: the report lists every destination with its
    # weight and the configured percentages, so one fixed draw is enough for the rest.
    decision: Decision = decide(snap, source, request, rand=lambda: 0.0)
    report["virtual_services_considered"] = considered
    report["route"] = {
        "kind": decision.kind,
        "route_name": decision.route_name,
        "rule": rule_doc,
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
    rule = rule or {}
    route.update(
        rewrite=_jsonable(rule.get("rewrite")) if rule.get("rewrite") else None,
        upstream_path=decision.path,
        upstream_authority=decision.authority,
        timeout=decision.timeout,
        retries=_retries_doc(decision.retries, "retries" in rule),
        fault=_fault_doc(rule),
        mirror=_jsonable(rule.get("mirror")) if rule.get("mirror") else None,
        request_headers=_jsonable(rule.get("headers")) if rule.get("headers") else None,
    )
    report["destinations"] = [_destination_doc(snap, d, caller) for d in decision.destinations]
    report["outcome"] = "route"
    report["summary"] = _route_summary(decision.route_name, report["destinations"])


def _route_summary(name: str, dests: list[dict[str, Any]]) -> str:
    parts = []
    for d in dests:
        subset = f" subset {d['subset']}" if d["subset"] else ""
        parts.append(f"{d['weight']}% to {d['host']}:{d['port']}{subset}")
    return f"routed by {name}: " + ", ".join(parts)


def _tcp(
    snap: Snapshot,
    caller: _Caller,
    source: Source,
    target: ServiceTarget,
    vip: str,
    report: dict[str, Any],
) -> None:
    l4 = outbound.decide(snap, vip, target.port.port, picker=_FirstPicker())
    if isinstance(l4, outbound.Passthrough):
        report["outcome"] = "passthrough"
        report["passthrough"] = {"address": l4.address, "port": l4.port, "reason": l4.reason}
        report["summary"] = f"passed through to {l4.address}:{l4.port} ({l4.reason})"
        return
    if isinstance(l4, outbound.Refuse):
        report["outcome"] = "refused"
        report["summary"] = f"refused: {l4.reason}"
        return
    decision = decide_tcp(
        snap,
        source,
        TcpRequest(target.service.hostname, target.port.port, vip),
        rand=lambda: 0.0,
    )
    report["tcp_route"] = {"route_name": decision.route_name}
    report["destinations"] = [_destination_doc(snap, d, caller) for d in decision.destinations]
    report["outcome"] = "route"
    report["summary"] = _route_summary(decision.route_name, report["destinations"])


class _FirstPicker:
    def pick(self, target: ServiceTarget, endpoints: tuple[Endpoint, ...]) -> Endpoint:
        return endpoints[0]


def _direct_workload(
    snap: Snapshot, caller: _Caller, wl: Workload, ip: str, port: int, report: dict[str, Any]
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
            "endpoints": [_endpoint_doc(snap, ep, caller)],
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
) -> dict[str, Any]:
    """The report for one request from `source` to `url`. Raises ExplainError on bad input."""
    target = parse_target(url)
    header_map = parse_headers(headers)
    caller = _caller(snap, source, namespace)
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
        _from_gateway(snap, caller, target, method, authority, header_map, report)
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
    report["resolved"].update(service=_service_doc(found.service), **_port_doc(found.port))
    protocol = found.port.protocol_hint
    # The proxy's L7 dispatch: an HTTP/1.1 service port, except a ServiceEntry resolved by
    # NONE/DNS, whose address the app already chose (it stays L4).
    l7 = protocol == "http" and not (
        found.service.kind == "ServiceEntry" and found.service.resolution != "STATIC"
    )
    if l7 and target.scheme == "http":
        report["protocol"] = "http"
        request = Request.from_target(
            method,
            authority,
            target.path + (f"?{target.query}" if target.query else ""),
            header_map,
            port=target.port,
            host=found.service.hostname,
        )
        l4 = outbound.decide(snap, vip, target.port, picker=_FirstPicker())
        if isinstance(l4, outbound.Passthrough):
            _tcp(snap, caller, src, found, vip, report)
            return report
        _http(snap, caller, src, request, report)
    else:
        report["protocol"] = "tcp"
        if l7:
            report["note"] = "the port is HTTP: the proxy parses HTTP whatever the URL scheme"
        _tcp(snap, caller, src, found, vip, report)
    return report


def _resolve_name(
    snap: Snapshot, caller: _Caller, target: Target, report: dict[str, Any]
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
    resolved.update(service=_service_doc(service), address=None, port=target.port)
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
                "endpoints": [_endpoint_doc(snap, ep, caller)],
            }
        )
    report["summary"] = (
        f"headless {service.ref}: DNS answers {len(addresses)} pod IP(s); the client dials one "
        "directly (no service routing)"
    )
    return None


def _unknown(snap: Snapshot, ip: str, port: int, report: dict[str, Any]) -> None:
    allow = outbound.decide(snap, ip, port, picker=_FirstPicker(), policy="ALLOW_ANY")
    strict = outbound.decide(snap, ip, port, picker=_FirstPicker(), policy="REGISTRY_ONLY")
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
    caller: _Caller,
    target: Target,
    method: str,
    authority: str,
    header_map: dict[str, str],
    report: dict[str, Any],
) -> None:
    """The ingress gateway's path: server by port and Host, then its bound VirtualServices."""
    report["protocol"] = "http"
    if target.scheme != "http":
        raise ExplainError(f"--to {target.url!r}: the gateway serves HTTP servers only")
    host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    servers = servers_by_port(snap, caller.labels).get(target.port, ())
    server = next((s for s in servers if any(host_matches(h, host) for h in s.hosts)), None)
    report["resolved"] = {
        "via": "gateway",
        "gateway": server.gateway if server else None,
        "server_hosts": list(server.hosts) if server else None,
        "port": target.port,
        "host": host,
    }
    if server is None:
        report["outcome"] = "no_route"
        report["summary"] = (
            f"no route (404 NR): no Gateway server selecting {caller.ref} serves port "
            f"{target.port} for host {host}"
        )
        return
    source = Source(namespace=server.namespace, labels=caller.labels, gateway=server.gateway)
    request = Request.from_target(
        method,
        authority,
        target.path + (f"?{target.query}" if target.query else ""),
        header_map,
        port=target.port,
        host=None,
    )
    _http(snap, caller, source, request, report)


# -- rendering ---------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    cells = [list(head), *[list(r) for r in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(head))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]


def _labels(labels: Mapping[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) if labels else "-"


def render(report: Mapping[str, Any]) -> str:
    """The report for people: plain sentences and small tables."""
    lines: list[str] = []
    src = report["source"]
    where = f" ({src['ip']}, node {src['node']})" if src["ip"] else ""
    assumed = " (assumed: no gateway workload registered)" if src["assumed"] else ""
    lines.append(f"Source:      {src['kind']} {src['ref']}{where}{assumed}")
    lines.append(f"             principal {src['principal']}")
    req = report["request"]
    what = f"{req['method']} " if req["method"] else ""
    lines.append(f"Request:     {what}{req['url']} (authority {req['authority']})")
    res = report["resolved"] or {}
    if res.get("via") == "gateway":
        gw = res.get("gateway") or "none"
        lines.append(f"Gateway:     {gw} on port {res['port']} for host {res['host']}")
    elif res:
        svc = res.get("service")
        if svc:
            vip = res.get("address") or "no VIP"
            lines.append(
                f"Resolved:    {res.get('name', res.get('address'))} → {svc['kind']} {svc['ref']} "
                f"({svc['host']}), {vip} port {res.get('port')}"
            )
        else:
            lines.append(f"Resolved:    {res.get('address')}:{res.get('port')}")
        if res.get("protocol"):
            lines.append(
                f"Port:        {res['port']} name {res['port_name'] or '-'}, "
                f"protocol {res['protocol']}, target port {res['target_port']}"
            )
        if res.get("workload"):
            lines.append(f"             the address of pod {res['workload']}")
    if report.get("protocol"):
        layer = "HTTP (L7 routing)" if report["protocol"] == "http" else "TCP (L4 routing)"
        lines.append(f"Handled as:  {layer}")
    if report.get("note"):
        lines.append(f"Note:        {report['note']}")
    route = report.get("route")
    if route:
        rule = route.get("rule")
        if rule:
            name = f" ({rule['rule_name']})" if rule["rule_name"] else ""
            lines.append(
                f"Matched:     VirtualService {rule['virtual_service']} rule "
                f"{rule['rule_index']}{name}, route name {route['route_name']}"
            )
            if rule["match_index"] is None:
                lines.append("             the rule has no match: it takes every request")
            else:
                conditions = "; ".join(rule["conditions"]) or "(empty match: everything)"
                lines.append(f"             match clause {rule['match_index']}: {conditions}")
        elif route["default"]:
            lines.append("Matched:     no VirtualService: default route to the service")
        if route.get("redirect"):
            r = route["redirect"]
            lines.append(f"Redirect:    {r['status']} Location: {r['location']}")
        if route.get("direct_response"):
            d = route["direct_response"]
            lines.append(f"Direct:      {d['status']} {d['body']!r}")
        if route.get("upstream_path") is not None and route["kind"] == "route":
            rewrite = " (rewritten)" if route.get("rewrite") else ""
            lines.append(
                f"Upstream:    path {route['upstream_path']}, authority "
                f"{route['upstream_authority']}{rewrite}"
            )
            timeout = route.get("timeout")
            lines.append(f"Timeout:     {f'{timeout:g}s' if timeout else 'none'}")
            rt = route["retries"]
            if rt["attempts"]:
                default = " (Istio default)" if rt["default"] else ""
                per_try = f", per try {rt['per_try_timeout']:g}s" if rt["per_try_timeout"] else ""
                lines.append(
                    f"Retries:     {rt['attempts']} on {','.join(rt['retry_on'])}{per_try}{default}"
                )
            else:
                lines.append("Retries:     none")
            fault = route.get("fault")
            if fault:
                if "delay" in fault:
                    fd = fault["delay"]
                    lines.append(
                        f"Fault:       delay {fd['fixed_delay']} for {fd['percent']:g}% of requests"
                    )
                if "abort" in fault:
                    fa = fault["abort"]
                    lines.append(
                        f"Fault:       abort {fa['http_status']} for {fa['percent']:g}% of requests"
                    )
            if route.get("mirror"):
                lines.append(f"Mirror:      {route['mirror'].get('host')}")
    if report.get("tcp_route"):
        lines.append(f"TCP route:   {report['tcp_route']['route_name']}")
    dests = report.get("destinations") or []
    if dests and report.get("outcome") == "route":
        lines.append("")
        lines.append("Destinations (each request picks one by weight):")
        rows = [
            [
                str(d["weight"]),
                d["host"],
                str(d["port"]),
                d["subset"] or "-",
                _labels(d["subset_labels"]),
                str(len(d["endpoints"])),
            ]
            for d in dests
        ]
        lines.extend(_table(["WEIGHT", "HOST", "PORT", "SUBSET", "LABELS", "ENDPOINTS"], rows))
    for d in dests:
        lines.append("")
        subset = f" subset {d['subset']}" if d["subset"] else ""
        lines.append(f"Endpoints of {d['host']}{subset}:")
        if d["error"]:
            lines.append(f"  {d['error']}")
        if not d["endpoints"]:
            continue
        rows = []
        for ep in d["endpoints"]:
            authz = ep["authorization"]
            verdict = "-"
            if authz:
                by = f" by {authz['policy']}" if authz["policy"] else ""
                verdict = f"{authz['decision']}{by}"
            rows.append(
                [
                    ep["pod"] or "-",
                    f"{ep['ip']}:{ep['port']}",
                    ep["node"] or "-",
                    ep["identity"] or "-",
                    ep["mtls_mode"] or "-",
                    "yes" if ep["tunnel"] else "no (plaintext)",
                    verdict,
                ]
            )
        lines.extend(
            _table(["POD", "ADDRESS", "NODE", "IDENTITY", "MTLS", "TUNNEL", "AUTHZ"], rows)
        )
        for ep in d["endpoints"]:
            authz = ep["authorization"]
            if authz:
                lines.append(f"  {ep['pod']}: {authz['decision']}: {authz['reason']}")
    if report.get("passthrough"):
        p = report["passthrough"]
        lines.append(f"Passthrough: {p['address']}:{p['port']} ({p['reason']})")
    lines.append("")
    lines.append(f"Verdict:     {report['summary']}")
    return "\n".join(lines) + "\n"


# -- the subcommand ----------------------------------------------------------------------------


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `meshctl explain` on the subparsers `sub` of meshctl's parser."""
    p = sub.add_parser(
        "explain", parents=[common], help="show what the mesh would do for one request"
    )
    p.add_argument(
        "--from", dest="source", required=True, metavar="POD", help="[ns/]name, or gateway"
    )
    p.add_argument("--to", dest="url", required=True, metavar="URL", help="http://host[:port]/…")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("-X", "--request", dest="method", default="GET", metavar="METHOD")
    p.add_argument("-o", "--output", choices=["json"], default=None)
    p.add_argument("--trust-domain", default="cluster.local")


async def load_snapshot(store_url: str, trust_domain: str = "cluster.local") -> Snapshot:
    """One snapshot of the store, built by the agent's builder."""
    store = await open_store(store_url)
    try:
        kvs, revision = await store.range(PREFIX)
    finally:
        await store.aclose()
    return SnapshotBuilder.build(kvs, revision, trust_domain=trust_domain).snapshot


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = str(getattr(args, "store", None) or os.environ.get(ENV_VAR) or DEFAULT_URL)
    namespace = str(getattr(args, "namespace", None) or "default")
    try:
        parse_target(args.url)  # bad input fails before the store is touched
        parse_headers(args.header)
        snap = await load_snapshot(url, args.trust_domain)
        report = explain(
            snap,
            source=args.source,
            url=args.url,
            headers=args.header,
            method=args.method,
            namespace=namespace,
        )
    except ExplainError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except StoreError as exc:
        print(f"error: store {url}: {exc}", file=err)
        return 1
    if args.output == "json":
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(render(report))
    return 0
