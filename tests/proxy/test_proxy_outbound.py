"""The outbound decision against real snapshots: no sockets, every destination kind."""

from __future__ import annotations

from collections import Counter

import pytest
from proxy_docs import config, snapshot, workload

from nodeagent.proxy.outbound import (
    Passthrough,
    Refuse,
    RoundRobinPicker,
    ToWorkload,
    decide,
)
from nodeagent.snapshot import Endpoint, ServiceTarget, Snapshot

SVC = {
    "clusterIP": "10.96.0.10",
    "selector": {"app": "web"},
    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
}


def mesh() -> Snapshot:
    return snapshot(
        workload("w1", "10.0.1.1", labels={"app": "web"}, sa="web"),
        workload("w2", "10.0.2.1", labels={"app": "web"}, sa="web", node="node-2"),
        workload("c1", "10.0.1.9", labels={"app": "client"}, sa="client"),
        config("Service", "web", SVC),
        config(
            "Service",
            "headless",
            {
                "clusterIP": "None",
                "selector": {"app": "web"},
                "ports": [{"name": "tcp", "port": 9000, "targetPort": 9000}],
            },
        ),
        config(
            "Service",
            "empty",
            {
                "clusterIP": "10.96.0.11",
                "selector": {"app": "nobody"},
                "ports": [{"name": "tcp", "port": 80}],
            },
        ),
        config(
            "ServiceEntry",
            "ext-static",
            {
                "hosts": ["db.example.com"],
                "addresses": ["192.0.2.10"],
                "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}],
                "resolution": "STATIC",
                "endpoints": [{"address": "198.51.100.7"}],
            },
        ),
        config(
            "ServiceEntry",
            "ext-none",
            {
                "hosts": ["api.example.com"],
                "addresses": ["192.0.2.20"],
                "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                "resolution": "NONE",
            },
        ),
    )


def test_service_vip_goes_through_the_tunnel_to_an_endpoint_with_target_port() -> None:
    d = decide(mesh(), "10.96.0.10", 80, picker=RoundRobinPicker())
    assert isinstance(d, ToWorkload)
    assert d.address in ("10.0.1.1", "10.0.2.1")
    assert d.port == 8080
    assert d.identity == "spiffe://cluster.local/ns/default/sa/web"
    assert d.service == "default/web"


def test_round_robin_spreads_over_endpoints() -> None:
    snap, picker = mesh(), RoundRobinPicker()
    seen = Counter(
        d.address
        for d in (decide(snap, "10.96.0.10", 80, picker=picker) for _ in range(10))
        if isinstance(d, ToWorkload)
    )
    assert seen == {"10.0.1.1": 5, "10.0.2.1": 5}


def test_pod_ip_is_the_workload_path_even_for_headless_services() -> None:
    d = decide(mesh(), "10.0.2.1", 9000, picker=RoundRobinPicker())
    assert isinstance(d, ToWorkload)
    assert (d.address, d.port, d.workload.uid) == ("10.0.2.1", 9000, "w2")
    assert d.service is None


def test_service_without_endpoints_is_refused_not_passed_through() -> None:
    d = decide(mesh(), "10.96.0.11", 80, picker=RoundRobinPicker())
    assert isinstance(d, Refuse)
    assert "no endpoints" in d.reason


def test_service_entry_static_endpoint_is_passed_through_to_the_endpoint() -> None:
    d = decide(mesh(), "192.0.2.10", 5432, picker=RoundRobinPicker())
    assert d == Passthrough("198.51.100.7", 5432, "endpoint outside the mesh", "default/ext-static")


def test_service_entry_resolution_none_passes_through_to_original_destination() -> None:
    d = decide(mesh(), "192.0.2.20", 443, picker=RoundRobinPicker())
    assert isinstance(d, Passthrough)
    assert (d.address, d.port, d.service) == ("192.0.2.20", 443, "default/ext-none")


@pytest.mark.parametrize(
    ("policy", "kind"), [("ALLOW_ANY", Passthrough), ("REGISTRY_ONLY", Refuse)]
)
def test_unknown_destination_follows_outbound_policy(policy: str, kind: type) -> None:
    d = decide(mesh(), "203.0.113.5", 443, picker=RoundRobinPicker(), policy=policy)
    assert isinstance(d, kind)


def test_registry_only_still_allows_registered_service_entries() -> None:
    d = decide(
        mesh(),
        "192.0.2.10",
        5432,
        picker=RoundRobinPicker(),
        policy="REGISTRY_ONLY",
    )
    assert isinstance(d, Passthrough)


def test_vip_on_an_undeclared_port_is_unknown() -> None:
    d = decide(mesh(), "10.96.0.10", 81, picker=RoundRobinPicker(), policy="REGISTRY_ONLY")
    assert isinstance(d, Refuse)


def test_picker_is_replaceable() -> None:
    class Last:
        def pick(self, target: ServiceTarget, endpoints: tuple[Endpoint, ...]) -> Endpoint:
            return endpoints[-1]

    snap = mesh()
    picks = [decide(snap, "10.96.0.10", 80, picker=Last()) for _ in range(3)]
    assert {p.address for p in picks if isinstance(p, ToWorkload)} == {"10.0.2.1"}
