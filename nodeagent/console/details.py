"""What a click on a graph node or edge shows: versions and their traffic share, the routes that
apply (asked of `meshctl explain`'s code, so the console and explain never disagree), the
authorization policies on the workloads, and their certificates with expiry. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nodeagent.console.checks import IssuedCert
from nodeagent.console.graph import GATEWAY, is_gateway, node_of_workload
from nodeagent.console.selection import backends
from nodeagent.meshctl.explain import ExplainError, explain
from nodeagent.snapshot import Snapshot, Workload
from nodeagent.snapshot.model import AuthorizationPolicy, Service
from nodeagent.telemetry.metrics import version_label

MAX_PORTS = 8  # routes explained per service: one explain per port


def _policy_doc(p: AuthorizationPolicy) -> dict[str, Any]:
    return {
        "ref": p.ref,
        "action": p.action,
        "selector": dict(p.selector) if p.selector is not None else None,
        "rules": len(p.rules),
    }


def _policies(snap: Snapshot, workloads: Sequence[Workload]) -> list[dict[str, Any]]:
    found: dict[str, AuthorizationPolicy] = {}
    for w in workloads:
        ap = snap.authorization_policies_for(w)
        for p in (*ap.deny, *ap.allow, *ap.audit):
            found.setdefault(p.ref, p)
    return [_policy_doc(found[k]) for k in sorted(found)]


def _certs(
    workloads: Sequence[Workload], certs: Iterable[IssuedCert], now: float
) -> list[dict[str, Any]]:
    identities = {w.identity for w in workloads}
    return [
        {
            "identity": c.identity,
            "node": c.node,
            "serial": c.serial,
            "not_after": c.not_after,
            "expires_in": round(c.not_after - now),
        }
        for c in sorted(certs, key=lambda c: (c.identity, c.node))
        if c.identity in identities
    ]


def _pod_doc(w: Workload) -> dict[str, Any]:
    return {
        "ref": w.ref,
        "node": w.node,
        "address": w.address,
        "version": version_label(w.labels),
        "identity": w.identity,
    }


def _caller(snap: Snapshot, graph: Mapping[str, Any], node_id: str, avoid: set[str]) -> str:
    """Whom to explain the routes for: a workload that calls the service (per the graph), else
    any meshed workload not behind it, else the ingress gateway."""
    callers = [e["source"] for e in graph.get("edges", ()) if e["target"] == node_id]
    by_node: dict[str, Workload] = {}
    for w in sorted(snap.workloads(), key=lambda w: w.ref):
        by_node.setdefault(node_of_workload(w), w)
    for nid in callers:
        if nid in by_node and nid != GATEWAY:
            return by_node[nid].ref
    for nid, w in by_node.items():
        if nid != GATEWAY and w.ref not in avoid and not is_gateway(w):
            return w.ref
    return "gateway"


def routes(snap: Snapshot, service: Service, source: str) -> list[dict[str, Any]]:
    """`meshctl explain --from source --to <service port>` for each of the service's ports."""
    out = []
    for port in service.ports[:MAX_PORTS]:
        http = port.protocol_hint in ("http", "http2", "grpc", "unknown")
        url = f"{'http' if http else 'tcp'}://{service.hostname}:{port.port}/"
        try:
            report = explain(snap, source=source, url=url, namespace=service.namespace)
        except ExplainError as exc:
            out.append({"port": port.port, "source": source, "error": str(exc)})
            continue
        route = report.get("route") or report.get("tcp_route")
        out.append(
            {
                "port": port.port,
                "protocol": report.get("protocol"),
                "source": source,
                "summary": report.get("summary"),
                "route": route,
                "destinations": [
                    {
                        "host": d.get("host"),
                        "subset": d.get("subset"),
                        "weight": d.get("weight"),
                        "endpoints": len(d.get("endpoints") or ()),
                    }
                    for d in report.get("destinations") or ()
                ],
            }
        )
    return out


def _shares(graph: Mapping[str, Any], node_id: str) -> list[dict[str, Any]]:
    """The versions behind a service and their share of its requests (or connections)."""
    out_edges = [e for e in graph.get("edges", ()) if e["source"] == node_id]
    nodes = {n["id"]: n for n in graph.get("nodes", ())}
    total = sum(e["request_rate"] or e["connection_rate"] for e in out_edges)
    by_target: dict[str, float] = {}
    for e in out_edges:
        by_target[e["target"]] = by_target.get(e["target"], 0.0) + (
            e["request_rate"] or e["connection_rate"]
        )
    return [
        {
            "workload": t,
            "version": nodes.get(t, {}).get("version"),
            "rate": round(r, 4),
            "share": round(r / total, 4) if total > 0 else 0.0,
        }
        for t, r in sorted(by_target.items())
    ]


def node_details(
    snap: Snapshot,
    graph: Mapping[str, Any],
    node_id: str,
    certs: Sequence[IssuedCert],
    now: float,
) -> dict[str, Any]:
    """The details panel of one node. Raises KeyError for an id the graph does not have."""
    nodes = {n["id"]: n for n in graph.get("nodes", ())}
    node = nodes[node_id]
    edges = [e for e in graph.get("edges", ()) if node_id in (e["source"], e["target"])]
    doc: dict[str, Any] = {"node": node, "edges": edges}
    if node["kind"] == "service":
        service = snap.service(node["namespace"], node["name"])
        pods = backends(snap, service) if service else []
        doc["versions"] = _shares(graph, node_id)
        doc["routes"] = (
            routes(snap, service, _caller(snap, graph, node_id, {w.ref for w in pods}))
            if service
            else []
        )
    else:
        pods = [w for w in snap.workloads() if node_of_workload(w) == node_id]
        pods.sort(key=lambda w: w.ref)
        doc["versions"] = sorted({version_label(w.labels) for w in pods})
    if node["kind"] == "gateway":
        doc["gateways"] = sorted(snap.indexes.gateways)
        doc["bound"] = {
            ref: [vs.ref for vs in snap.virtual_services_for_gateway(ref)]
            for ref in sorted(snap.indexes.gateways)
        }
    doc["pods"] = [_pod_doc(w) for w in pods]
    doc["policies"] = _policies(snap, pods)
    doc["certificates"] = _certs(pods, certs, now)
    return doc


def edge_details(
    snap: Snapshot,
    graph: Mapping[str, Any],
    edge_id: str,
    certs: Sequence[IssuedCert],
    now: float,
) -> dict[str, Any]:
    """An edge and, when it ends at a service, the routes from its source. KeyError if absent."""
    edges = {e["id"]: e for e in graph.get("edges", ())}
    edge = edges[edge_id]
    nodes = {n["id"]: n for n in graph.get("nodes", ())}
    target = nodes.get(edge["target"], {})
    doc: dict[str, Any] = {"edge": edge}
    if target.get("kind") == "service":
        service = snap.service(target["namespace"], target["name"])
        source = edge["source"]
        caller = "gateway" if source == GATEWAY else None
        if caller is None:
            pods = sorted(
                (w for w in snap.workloads() if node_of_workload(w) == source), key=lambda w: w.ref
            )
            caller = pods[0].ref if pods else None
        if service is not None and caller is not None:
            doc["routes"] = routes(snap, service, caller)
    return doc
