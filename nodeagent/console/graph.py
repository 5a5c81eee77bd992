"""The service graph: nodes from the snapshot (workloads by version, services, the ingress
gateway as one node), edges from the traffic rates, coloured with Kiali's default health
thresholds (5xx ratio ≥ 0.1 % degraded, ≥ 10 % failing). Pure.

A request from a client to a service is drawn as two edges, client → service and service →
the workload (version) that answered, as Kiali's versioned-app graph does; a connection to a
workload without a service is one edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nodeagent.console.selection import backends
from nodeagent.console.traffic import Counters, EdgeKey, quantile
from nodeagent.snapshot import Snapshot, Workload
from nodeagent.telemetry.metrics import UNKNOWN, app_label, version_label, workload_name

Health = Literal["healthy", "degraded", "failing", "idle"]
DEGRADED = 0.001  # Kiali's defaults for the 5xx ratio
FAILING = 0.10
GATEWAY = "gateway"
OUTSIDE = "unknown"
GATEWAY_APP = "istio-ingressgateway"
GATEWAY_NAMESPACE = "istio-system"
GRPC = frozenset({"grpc", "grpc-web"})


def health(requests: float, errors: float, connections: float = 0.0) -> Health:
    if requests <= 0:
        return "healthy" if connections > 0 else "idle"
    ratio = errors / requests
    if ratio >= FAILING:
        return "failing"
    if ratio >= DEGRADED:
        return "degraded"
    return "healthy"


def workload_id(namespace: str, workload: str) -> str:
    return f"wl:{namespace}/{workload}"


def service_id(namespace: str, name: str) -> str:
    return f"svc:{namespace}/{name}"


def is_gateway(w: Workload) -> bool:
    return w.namespace == GATEWAY_NAMESPACE and app_label(w.labels) == GATEWAY_APP


def node_of_workload(w: Workload) -> str:
    return GATEWAY if is_gateway(w) else workload_id(w.namespace, workload_name(w.name))


def _source_id(key: EdgeKey) -> str:
    if key.source_app == GATEWAY_APP or key.source_workload.startswith(GATEWAY_APP):
        return GATEWAY
    if key.source_workload == UNKNOWN:
        return OUTSIDE
    return workload_id(key.source_namespace, key.source_workload)


def _protocol(snap: Snapshot, key: EdgeKey) -> str:
    """The edge's protocol: the metrics' `request_protocol`, except that requests to a service
    whose ports are all gRPC by Istio's naming rules (`grpc-…`, appProtocol) are gRPC."""
    if key.protocol != "http":
        return key.protocol
    svc = snap.service(key.service_namespace, key.service_name)
    if svc is not None and svc.ports and all(p.protocol_hint in GRPC for p in svc.ports):
        return "grpc"
    return "http"


@dataclass(slots=True)
class _Edge:
    source: str
    target: str
    protocol: str
    counters: Counters


def edge_doc(edge_id: str, source: str, target: str, protocol: str, c: Counters) -> dict[str, Any]:
    p99 = quantile(0.99, c.buckets)
    return {
        "id": edge_id,
        "source": source,
        "target": target,
        "protocol": protocol,
        "mtls": c.mtls,
        "request_rate": round(c.requests, 4),
        "error_rate": round(c.errors, 4),
        "error_ratio": round(c.errors / c.requests, 6) if c.requests > 0 else 0.0,
        "p99_ms": None if p99 is None else round(p99, 2),
        "connection_rate": round(c.connections, 4),
        "byte_rate": round(c.bytes, 1),
        "health": health(c.requests, c.errors, c.connections),
    }


def build_graph(
    snap: Snapshot, rates: Mapping[EdgeKey, Counters], *, window: float
) -> dict[str, Any]:
    """The graph document `/api/graph` serves."""
    nodes: dict[str, dict[str, Any]] = {}
    for w in sorted(snap.workloads(), key=lambda w: w.ref):
        nid = node_of_workload(w)
        if nid == GATEWAY:
            node = nodes.setdefault(
                GATEWAY,
                {"id": GATEWAY, "kind": "gateway", "namespace": w.namespace,
                 "name": GATEWAY_APP, "app": GATEWAY_APP, "version": None, "pods": 0},
            )  # fmt: skip
        else:
            node = nodes.setdefault(
                nid,
                {"id": nid, "kind": "workload", "namespace": w.namespace,
                 "name": workload_name(w.name), "app": app_label(w.labels),
                 "version": version_label(w.labels), "pods": 0},
            )  # fmt: skip
        node["pods"] += 1
    for svc in sorted(snap.services(), key=lambda s: (s.namespace, s.name)):
        if svc.kind != "Service":
            continue
        sid = service_id(svc.namespace, svc.name)
        pods = backends(snap, svc)
        nodes[sid] = {
            "id": sid,
            "kind": "service",
            "namespace": svc.namespace,
            "name": svc.name,
            "host": svc.hostname,
            "app": svc.name,
            "version": None,
            "versions": sorted({version_label(w.labels) for w in pods}),
            "workloads": sorted({node_of_workload(w) for w in pods}),
        }
    edges: dict[tuple[str, str, str], _Edge] = {}

    def add(source: str, target: str, protocol: str, c: Counters) -> None:
        edge = edges.get((source, target, protocol))
        if edge is None:
            edges[(source, target, protocol)] = _Edge(source, target, protocol, Counters())
            edge = edges[(source, target, protocol)]
        edge.counters.add(c)

    for key, c in rates.items():
        src = _source_id(key)
        if src == OUTSIDE:
            nodes.setdefault(
                OUTSIDE, {"id": OUTSIDE, "kind": "outside", "name": "outside the mesh"}
            )
        dst_wl = (
            workload_id(key.destination_namespace, key.destination_workload)
            if key.destination_workload != UNKNOWN
            else None
        )
        dst_svc = (
            service_id(key.service_namespace, key.service_name)
            if key.service_name != UNKNOWN
            else None
        )
        seen: list[tuple[str | None, str, str, str]] = [
            (dst_svc, "service", key.service_namespace, key.service_name),
            (dst_wl, "workload", key.destination_namespace, key.destination_workload),
        ]
        for found, kind, ns, name in seen:
            if found is not None and found not in nodes:  # traffic to something gone since
                nodes[found] = {"id": found, "kind": kind, "namespace": ns, "name": name,
                              "app": name, "version": key.destination_version}  # fmt: skip
        protocol = _protocol(snap, key)
        if dst_svc is not None:
            add(src, dst_svc, protocol, c)
            if dst_wl is not None:
                add(dst_svc, dst_wl, protocol, c)
        elif dst_wl is not None:
            add(src, dst_wl, protocol, c)
    # HTTP through the tunnel is also a TCP connection at the destination's end: one edge,
    # the HTTP one, carries both (Kiali draws the request protocol).
    for (source, target, protocol), edge in list(edges.items()):
        if protocol != "tcp":
            continue
        l7 = next(
            (e for (s, t, p), e in edges.items() if (s, t) == (source, target) and p != "tcp"), None
        )
        if l7 is not None and edge.counters.requests == 0:
            l7.counters.connections += edge.counters.connections
            l7.counters.bytes += edge.counters.bytes
            l7.counters.mtls = l7.counters.mtls or edge.counters.mtls
            del edges[(source, target, protocol)]
    edge_docs = [
        edge_doc(f"{e.source}>{e.target}:{e.protocol}", e.source, e.target, e.protocol, e.counters)
        for e in sorted(edges.values(), key=lambda e: (e.source, e.target, e.protocol))
    ]
    for node in nodes.values():
        inbound = [e for e in edge_docs if e["target"] == node["id"]]
        measured = inbound or [e for e in edge_docs if e["source"] == node["id"]]
        requests = sum(e["request_rate"] for e in measured)
        errors = sum(e["error_rate"] for e in measured)
        conns = sum(e["connection_rate"] for e in measured)
        node["request_rate"] = round(requests, 4)
        node["error_ratio"] = round(errors / requests, 6) if requests > 0 else 0.0
        node["health"] = health(requests, errors, conns)
    return {
        "revision": snap.revision,
        "window": window,
        "nodes": sorted(nodes.values(), key=lambda n: str(n["id"])),
        "edges": edge_docs,
    }
