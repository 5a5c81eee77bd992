"""How the report describes each piece it shows: services, ports, endpoints (with the mTLS
mode and authorization verdict the destination would give), route destinations, retries,
faults and the matched VirtualService rule. Pure; every value is JSON-able.

The rule parts are described from the compiled routes (`nodeagent.snapshot.routes`) that the
routing decision matched (`RouteDecision.matched`): the report shows what the proxy runs.
"""

from __future__ import annotations

from typing import Any

from nodeagent.meshctl.explain.inputs import Caller
from nodeagent.proxy.inbound import plaintext_decision, tunnel_decision
from nodeagent.routing import MatchedRule, RouteDestination
from nodeagent.snapshot import Endpoint, Service, ServicePort, Snapshot
from nodeagent.snapshot.endpointslices import uses_endpoint_slices
from nodeagent.snapshot.routes import (
    DEFAULT_RETRIES,
    FaultRule,
    HeaderOps,
    Headers,
    HttpMatch,
    Mirror,
    RetryPolicy,
    Rewrite,
    StringMatch,
)


def service_doc(service: Service) -> dict[str, Any]:
    return {
        "kind": service.kind,
        "ref": service.ref,
        "host": service.hostname,
        "addresses": list(service.addresses),
        "headless": service.headless,
    }


def port_doc(port: ServicePort) -> dict[str, Any]:
    return {
        "port": port.port,
        "port_name": port.name,
        "protocol": port.protocol_hint,
        "target_port": port.target_port,
    }


def endpoint_doc(snap: Snapshot, ep: Endpoint, caller: Caller) -> dict[str, Any]:
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
        # outbound_decision: an endpoint outside the mesh is reached directly, in plaintext.
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
            "layer": "tcp",  # HTTP ports: replaced by the request's verdict (l7.py)
        },
    )
    return doc


def destination_doc(snap: Snapshot, dest: RouteDestination, caller: Caller) -> dict[str, Any]:
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
    doc["endpoints"] = [endpoint_doc(snap, ep, caller) for ep in endpoints]
    # A Service without a selector: its endpoints are its EndpointSlices' addresses.
    doc["endpoint_slices"] = uses_endpoint_slices(dest.service)
    # Selected but no endpoint: their agent cannot terminate mTLS for them yet.
    doc["unhealthy"] = [
        {"workload": w.ref, "address": w.address, "node": w.node, "status": w.status}
        for w in snap.unhealthy_members(dest.service)
    ]
    if not endpoints:
        doc["error"] = "no endpoints (503 UH)"
    return doc


def retries_doc(policy: RetryPolicy, configured: bool) -> dict[str, Any]:
    return {
        "attempts": policy.attempts,
        "per_try_timeout": policy.per_try_timeout,
        "retry_on": sorted(policy.retry_on),
        "status_codes": sorted(policy.status_codes),
        "default": not configured and policy == DEFAULT_RETRIES,
    }


def fault_doc(fault: FaultRule | None) -> dict[str, Any] | None:
    """The configured fault (with its percentages), not one sampled draw."""
    if fault is None:
        return None
    out: dict[str, Any] = {}
    if fault.delay is not None:
        out["delay"] = {"seconds": fault.delay, "percent": fault.delay_percent}
    if fault.abort_status is not None:
        out["abort"] = {"http_status": fault.abort_status, "percent": fault.abort_percent}
    return out


def rewrite_doc(rewrite: Rewrite | None) -> dict[str, Any] | None:
    if rewrite is None:
        return None
    out: dict[str, Any] = {"uri": rewrite.uri, "authority": rewrite.authority}
    if rewrite.uri_regex is not None:
        out["uri_regex_rewrite"] = {
            "match": rewrite.uri_regex.value,
            "rewrite": rewrite.uri_regex_rewrite,
        }
    return out


def mirror_doc(mirror: Mirror | None) -> dict[str, Any] | None:
    if mirror is None:
        return None
    d = mirror.destination
    return {"host": d.fqdn, "subset": d.subset, "port": d.port, "percent": mirror.percent}


def _ops_doc(ops: HeaderOps) -> dict[str, Any]:
    return {"set": dict(ops.set), "add": dict(ops.add), "remove": list(ops.remove)}


def headers_doc(headers: Headers) -> dict[str, Any] | None:
    """The rule's header operations in Istio's shape (`request`/`response` → set/add/remove)."""
    out = {
        side: _ops_doc(ops)
        for side, ops in (("request", headers.request), ("response", headers.response))
        if ops
    }
    return out or None


def _string(m: StringMatch) -> str:
    if m.kind == "present":
        return "present"
    return f'{m.kind} "{m.value}"'


def match_doc(match: HttpMatch) -> dict[str, Any]:
    """One compiled match entry as JSON: each condition it sets, `{kind: value}` for strings."""

    def string(m: StringMatch) -> dict[str, str]:
        return {} if m.kind == "present" else {m.kind: m.value}

    out: dict[str, Any] = {}
    if match.name is not None:
        out["name"] = match.name
    for key, m in (
        ("uri", match.uri),
        ("scheme", match.scheme),
        ("method", match.method),
        ("authority", match.authority),
    ):
        if m is not None:
            out[key] = string(m)
    for key, named in (
        ("headers", match.headers),
        ("withoutHeaders", match.without_headers),
        ("queryParams", match.query_params),
    ):
        if named:
            out[key] = {name: string(m) for name, m in named}
    if match.uri is not None and match.uri.ignore_case:
        out["ignoreUriCase"] = True
    if match.port is not None:
        out["port"] = match.port
    if match.source_labels:
        out["sourceLabels"] = dict(match.source_labels)
    if match.source_namespace is not None:
        out["sourceNamespace"] = match.source_namespace
    if match.gateways is not None:
        out["gateways"] = sorted(match.gateways)
    return out


def describe_match(match: HttpMatch) -> list[str]:
    """Readable conditions of one compiled match entry, e.g. `uri prefix "/my-app"`."""
    out: list[str] = []
    for key, m in (
        ("uri", match.uri),
        ("scheme", match.scheme),
        ("method", match.method),
        ("authority", match.authority),
    ):
        if m is not None:
            out.append(f"{key} {_string(m)}")
    for key, named in (
        ("headers", match.headers),
        ("withoutHeaders", match.without_headers),
        ("queryParams", match.query_params),
    ):
        for name, m in named:
            out.append(f"{key}[{name}] {_string(m)}")
    if match.uri is not None and match.uri.ignore_case:
        out.append("ignoreUriCase")
    if match.port is not None:
        out.append(f"port {match.port}")
    if match.source_labels:
        out.append("sourceLabels " + ",".join(f"{k}={v}" for k, v in match.source_labels.items()))
    if match.source_namespace is not None:
        out.append(f"sourceNamespace {match.source_namespace}")
    if match.gateways is not None:
        out.append("gateways " + ",".join(sorted(match.gateways)))
    return out


def rule_doc(matched: MatchedRule) -> dict[str, Any]:
    """The rule (and match entry) the routing decision took."""
    route = matched.route
    index = next((i for i, m in enumerate(route.matches) if m is matched.match), None)
    return {
        "virtual_service": matched.virtual_service.ref,
        "rule_index": matched.index,
        "rule_name": route.name,
        "match_index": index,
        "match": match_doc(matched.match) if matched.match is not None else None,
        "conditions": describe_match(matched.match) if matched.match is not None else [],
    }
