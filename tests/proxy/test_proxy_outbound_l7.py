"""The outbound pieces the L7 wiring added: which ports go to the HTTP proxy (`http_target`),
VirtualService tcp routes with weights and subsets in `decide`."""

from __future__ import annotations

from collections import Counter

from proxy_docs import config, snapshot, workload

from nodeagent.proxy.outbound import (
    Refuse,
    RoundRobinPicker,
    ToWorkload,
    decide,
    http_target,
)
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot


def mesh(*extra: tuple[str, object]) -> Snapshot:
    return snapshot(
        workload("v1", "10.0.1.1", labels={"app": "web", "version": "v1"}, sa="web"),
        workload("v2", "10.0.1.2", labels={"app": "web", "version": "v2"}, sa="web"),
        config(
            "Service",
            "web",
            {
                "clusterIP": "10.96.0.10",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "tcp-db", "port": 5432, "targetPort": 5432},
                    {"name": "grpc", "port": 9090, "targetPort": 9090},
                    {"name": "web", "port": 81, "targetPort": 8081, "appProtocol": "http"},
                ],
            },
        ),
        config(
            "DestinationRule",
            "web",
            {
                "host": "web",
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}},
                ],
            },
        ),
        *extra,  # type: ignore[arg-type]
    )


def tcp_route(*weights: tuple[str, int]) -> tuple[str, object]:
    route = [{"destination": {"host": "web", "subset": s}, "weight": w} for s, w in weights]
    return config("VirtualService", "web", {"hosts": ["web"], "tcp": [{"route": route}]})


def test_http_target_only_for_http1_service_ports() -> None:
    snap = mesh()
    found = http_target(snap, "10.96.0.10", 80)
    assert found is not None
    assert found.service.name == "web"
    assert http_target(snap, "10.96.0.10", 81) is not None  # appProtocol: http
    assert http_target(snap, "10.96.0.10", 5432) is None  # tcp- prefix: L4
    assert http_target(snap, "10.96.0.10", 9090) is None  # grpc is HTTP/2: L4 for now
    assert http_target(snap, "10.0.1.1", 8080) is None  # a pod IP: not a service port
    assert http_target(snap, "203.0.113.9", 80) is None


def test_tcp_route_sends_every_connection_to_the_weighted_subset() -> None:
    snap = mesh(tcp_route(("v1", 0), ("v2", 100)))
    picker = RoundRobinPicker()
    got = Counter()
    for _ in range(10):
        d = decide(snap, "10.96.0.10", 5432, picker=picker, source=Source("default"))
        assert isinstance(d, ToWorkload)
        assert d.route is not None
        got[d.workload.uid] += 1
    assert got == {"v2": 10}


def test_tcp_route_weights_follow_rand() -> None:
    snap = mesh(tcp_route(("v1", 80), ("v2", 20)))
    picker = RoundRobinPicker()
    low = decide(snap, "10.96.0.10", 5432, picker=picker, source=Source(), rand=lambda: 0.5)
    high = decide(snap, "10.96.0.10", 5432, picker=picker, source=Source(), rand=lambda: 0.9)
    assert isinstance(low, ToWorkload)
    assert isinstance(high, ToWorkload)
    assert (low.workload.uid, high.workload.uid) == ("v1", "v2")


def test_no_tcp_route_keeps_round_robin_over_the_service() -> None:
    snap = mesh()
    picker = RoundRobinPicker()
    names = []
    for _ in range(4):
        d = decide(snap, "10.96.0.10", 5432, picker=picker)
        assert isinstance(d, ToWorkload)
        assert d.route is None
        names.append(d.workload.uid)
    assert sorted(names) == ["v1", "v1", "v2", "v2"]


def test_tcp_route_to_an_undefined_subset_is_refused() -> None:
    snap = mesh(tcp_route(("v9", 100)))
    d = decide(snap, "10.96.0.10", 5432, picker=RoundRobinPicker(), source=Source("default"))
    assert isinstance(d, Refuse)
    assert "v9" in d.reason
