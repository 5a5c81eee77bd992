"""How the report describes each piece it shows: services, ports, endpoints (with the mTLS
mode and authorization verdict the destination would give), route destinations, retries,
faults and the matched VirtualService rule. Pure; every value is JSON-able.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeagent.meshctl.explain.inputs import Caller
from nodeagent.proxy.inbound import plaintext_decision, tunnel_decision
from nodeagent.routing import Request, RouteDestination, Source
from nodeagent.routing.decide import match_request
from nodeagent.routing.model import DEFAULT_RETRIES, RetryPolicy
from nodeagent.snapshot import Endpoint, Service, ServicePort, Snapshot


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


def _percent(doc: Mapping[str, Any], old_key: str = "percent") -> float:
    if (p := doc.get("percentage")) is not None:
        return float(p.get("value", 0.0))
    if (old := doc.get(old_key)) is not None:
        return float(old)
    return 100.0


def fault_doc(rule: Mapping[str, Any]) -> dict[str, Any] | None:
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


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
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


def matched_rule(
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
        "match": jsonable(clause) if clause is not None else None,
        "conditions": describe_match(clause) if clause is not None else [],
    }
