"""The outbound pieces the L7 wiring added: which ports go to the HTTP proxy (`http_target`),
and VirtualService tcp routes with weights and subsets in `outbound_decision`."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from proxy_docs import config, snapshot, workload

from nodeagent.balance import Registry
from nodeagent.proxy.outbound import (
    Refuse,
    ToWorkload,
    http_target,
    l7_target,
    outbound_decision,
)
from nodeagent.routing import Source
from nodeagent.snapshot import L7Protocol, ServicePort, Snapshot


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
                    {"name": "metrics", "port": 9100, "targetPort": 9100},
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


def test_http_target_only_for_http_and_http2_service_ports() -> None:
    snap = mesh()
    found = http_target(snap, "10.96.0.10", 80)
    assert found is not None
    assert found.service.name == "web"
    assert http_target(snap, "10.96.0.10", 81) is not None  # appProtocol: http
    assert http_target(snap, "10.96.0.10", 5432) is None  # tcp- prefix: L4
    assert http_target(snap, "10.96.0.10", 9090) is not None  # grpc: the HTTP/2 proxy
    assert http_target(snap, "10.0.1.1", 8080) is None  # a pod IP: not a service port
    assert http_target(snap, "203.0.113.9", 80) is None


@pytest.mark.parametrize(
    ("name", "app_protocol", "expected"),
    [
        ("http", None, L7Protocol.HTTP1),
        ("http-web", None, L7Protocol.HTTP1),
        ("HTTP2-x", None, L7Protocol.HTTP2),
        ("grpc", None, L7Protocol.HTTP2),
        ("grpc-web", None, L7Protocol.HTTP2),
        ("h2c-api", None, L7Protocol.HTTP2),
        ("web", "kubernetes.io/h2c", L7Protocol.HTTP2),
        ("web", "grpc", L7Protocol.HTTP2),
        ("web", "http2", L7Protocol.HTTP2),
        ("grpc", "tcp", L7Protocol.OPAQUE),  # appProtocol wins over the name
        ("tcp-db", None, L7Protocol.OPAQUE),
        ("https", None, L7Protocol.OPAQUE),
        ("mongo", None, L7Protocol.OPAQUE),
        ("web", None, L7Protocol.SNIFF),
        ("", None, L7Protocol.SNIFF),
    ],
)
def test_protocol_selection_as_istio(
    name: str, app_protocol: str | None, expected: L7Protocol
) -> None:
    port = ServicePort(name=name, port=80, target_port=80, app_protocol=app_protocol)
    assert port.l7_protocol is expected


def test_udp_ports_are_never_l7() -> None:
    port = ServicePort(name="http", port=53, target_port=53, protocol="UDP")
    assert port.l7_protocol is L7Protocol.OPAQUE


def test_undeclared_ports_are_l7_targets_to_sniff_but_not_http_targets() -> None:
    snap = mesh()
    found = l7_target(snap, "10.96.0.10", 9100)
    assert found is not None
    assert found.port.l7_protocol is L7Protocol.SNIFF
    assert http_target(snap, "10.96.0.10", 9100) is None
    assert l7_target(snap, "10.96.0.10", 5432) is None  # tcp-: never sniffed


def test_tcp_route_sends_every_connection_to_the_weighted_subset() -> None:
    snap = mesh(tcp_route(("v1", 0), ("v2", 100)))
    registry = Registry(on_event=None, rng=random.Random(7))
    got = Counter()
    for _ in range(10):
        d = outbound_decision(snap, "10.96.0.10", 5432, registry=registry, source=Source("default"))
        assert isinstance(d, ToWorkload)
        assert d.route is not None
        got[d.workload.uid] += 1
    assert got == {"v2": 10}


def test_tcp_route_weights_follow_rand() -> None:
    snap = mesh(tcp_route(("v1", 80), ("v2", 20)))
    registry = Registry(on_event=None, rng=random.Random(7))
    low = outbound_decision(
        snap, "10.96.0.10", 5432, registry=registry, source=Source(), rand=lambda: 0.5
    )
    high = outbound_decision(
        snap, "10.96.0.10", 5432, registry=registry, source=Source(), rand=lambda: 0.9
    )
    assert isinstance(low, ToWorkload)
    assert isinstance(high, ToWorkload)
    assert (low.workload.uid, high.workload.uid) == ("v1", "v2")


def test_no_tcp_route_balances_over_the_whole_service() -> None:
    snap = mesh()
    registry = Registry(on_event=None, rng=random.Random(7))
    names = set()
    for _ in range(20):
        d = outbound_decision(snap, "10.96.0.10", 5432, registry=registry)
        assert isinstance(d, ToWorkload)
        assert d.route is None
        names.add(d.workload.uid)
    assert names == {"v1", "v2"}


def test_tcp_route_to_an_undefined_subset_is_refused() -> None:
    snap = mesh(tcp_route(("v9", 100)))
    d = outbound_decision(
        snap, "10.96.0.10", 5432, registry=Registry(on_event=None), source=Source("default")
    )
    assert isinstance(d, Refuse)
    assert "v9" in d.reason
