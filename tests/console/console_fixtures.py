"""A small mesh for the console's unit tests: a snapshot built by the agent's builder, and
agents' `/stats/prometheus` bodies rendered by the telemetry package's own registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snapshot_docs import service, snapshot_of, workload

from nodeagent.snapshot import Snapshot
from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry, peer_labels

VIP = "10.96.0.10"
DB_VIP = "10.96.0.11"


def vs(name: str, host: str, subsets: list[tuple[str, int]], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "hosts": [host],
            "http": [
                {
                    "route": [
                        {"destination": {"host": host, "subset": s}, "weight": w}
                        for s, w in subsets
                    ]
                }
            ],
            **extra,
        },
    }


def mesh_docs() -> list[dict[str, Any]]:
    """client → my-app (v1, v2, v3 on two nodes), my-app → db over TCP, a gateway; and config
    with one problem of each kind the checks know."""
    db = service("db", cluster_ip=DB_VIP, port=5432, target=5432, port_name="tcp-db")
    return [
        workload("c1", "10.1.0.5", {"app": "client"}, name="client", sa="client"),
        *(
            workload(
                f"a{i}",
                f"10.1.0.{5 + i}",
                {"app": "my-app", "version": f"v{i}"},
                name=f"my-app-v{i}",
                node="node-2",
                sa="my-app",
            )
            for i in (1, 2, 3)
        ),
        workload("d1", "10.1.0.9", {"app": "db"}, name="db", sa="db"),
        workload(
            "gw",
            None,
            {"app": "istio-ingressgateway", "istio": "ingressgateway"},
            name="istio-ingressgateway-node-1",
            namespace="istio-system",
            sa="istio-ingressgateway-service-account",
        ),
        service("my-app", cluster_ip=VIP),
        db,
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "my-app", "namespace": "default"},
            "spec": {
                "host": "my-app",
                "subsets": [
                    {"name": v, "labels": {"version": v}} for v in ("v1", "v2", "v3", "v9")
                ],
            },
        },
        vs("my-app", "my-app", [("v1", 80), ("v2", 20)]),
        vs("my-app-typo", "db", [("missing", 100)]),
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "nobody", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "ghost"}}, "action": "ALLOW"},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "my-app-allow", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "my-app"}},
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"namespaces": ["default"]}}]}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "lonely", "namespace": "default"},
            "spec": {
                "selector": {"istio": "ingressgateway"},
                "servers": [
                    {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}
                ],
            },
        },
    ]


def mesh() -> Snapshot:
    return snapshot_of(mesh_docs())


@dataclass(frozen=True)
class Calls:
    """Requests from one workload (by uid) to another through a service, per status code."""

    source: str
    destination: str
    service: str
    codes: dict[int, int]
    duration_ms: float = 20.0
    tcp: bool = False


def exposition(snap: Snapshot, calls: list[Calls]) -> str:
    """An agent's /stats/prometheus body after `calls`, from the telemetry package's registry."""
    registry = MetricsRegistry()
    metrics = IstioMetrics(registry)
    for call in calls:
        src = snap.workload(call.source)
        dst = snap.workload(call.destination)
        svc = snap.service("default", call.service)
        if call.tcp:
            for reporter in ("source", "destination"):
                peer = peer_labels(
                    reporter=reporter, source=src, destination=dst, service=svc, protocol="tcp"
                )
                for _ in range(sum(call.codes.values())):
                    labels = metrics.connection_opened(peer, security_policy="mutual_tls")
                    metrics.connection_closed(labels, sent=100, received=10)
            continue
        peer = peer_labels(
            reporter="source", source=src, destination=dst, service=svc, protocol="http"
        )
        for code, n in call.codes.items():
            for _ in range(n):
                metrics.record_request(
                    peer,
                    response_code=code,
                    duration_ms=call.duration_ms,
                    request_bytes=0,
                    response_bytes=10,
                    security_policy="mutual_tls",
                )
    return registry.render()
