"""The outbound decision against real snapshots: no sockets, every destination kind."""

from __future__ import annotations

from collections import Counter

import pytest
from proxy_docs import config, snapshot, workload

from nodeagent.balance import Registry
from nodeagent.proxy.outbound import Passthrough, Refuse, ToWorkload, outbound_decision
from nodeagent.snapshot import Snapshot

SVC = {
    "clusterIP": "10.96.0.10",
    "selector": {"app": "web"},
    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
}


def mesh() -> Snapshot:
    return snapshot(*_MESH_DOCS)


_MESH_DOCS = (
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
    d = outbound_decision(mesh(), "10.96.0.10", 80, registry=Registry(on_event=None))
    assert isinstance(d, ToWorkload)
    assert d.address in ("10.0.1.1", "10.0.2.1")
    assert d.port == 8080
    assert d.identity == "spiffe://cluster.local/ns/default/sa/web"
    assert d.service == "default/web"


def test_the_registry_picks_with_the_destination_rule_policy() -> None:
    rr = config(
        "DestinationRule",
        "web",
        {"host": "web", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}},
    )
    snap, registry = snapshot(*_MESH_DOCS, rr), Registry(on_event=None)
    seen = Counter(
        d.address
        for d in (outbound_decision(snap, "10.96.0.10", 80, registry=registry) for _ in range(10))
        if isinstance(d, ToWorkload)
    )
    assert seen == {"10.0.1.1": 5, "10.0.2.1": 5}
    picked = outbound_decision(snap, "10.96.0.10", 80, registry=registry)
    assert isinstance(picked, ToWorkload)
    assert picked.handle is not None
    assert picked.handle.endpoint.address == picked.address


def test_pod_ip_is_the_workload_path_even_for_headless_services() -> None:
    d = outbound_decision(mesh(), "10.0.2.1", 9000, registry=Registry(on_event=None))
    assert isinstance(d, ToWorkload)
    assert (d.address, d.port, d.workload.uid) == ("10.0.2.1", 9000, "w2")
    assert d.service is None


def test_service_without_endpoints_is_refused_not_passed_through() -> None:
    d = outbound_decision(mesh(), "10.96.0.11", 80, registry=Registry(on_event=None))
    assert isinstance(d, Refuse)
    assert "no endpoints" in d.reason


def test_service_entry_static_endpoint_is_passed_through_to_the_endpoint() -> None:
    d = outbound_decision(mesh(), "192.0.2.10", 5432, registry=Registry(on_event=None))
    assert d == Passthrough("198.51.100.7", 5432, "endpoint outside the mesh", "default/ext-static")


def test_service_entry_resolution_none_passes_through_to_original_destination() -> None:
    d = outbound_decision(mesh(), "192.0.2.20", 443, registry=Registry(on_event=None))
    assert isinstance(d, Passthrough)
    assert (d.address, d.port, d.service) == ("192.0.2.20", 443, "default/ext-none")


@pytest.mark.parametrize(
    ("policy", "kind"), [("ALLOW_ANY", Passthrough), ("REGISTRY_ONLY", Refuse)]
)
def test_unknown_destination_follows_outbound_policy(policy: str, kind: type) -> None:
    d = outbound_decision(
        mesh(), "203.0.113.5", 443, registry=Registry(on_event=None), policy=policy
    )
    assert isinstance(d, kind)


def test_registry_only_still_allows_registered_service_entries() -> None:
    d = outbound_decision(
        mesh(),
        "192.0.2.10",
        5432,
        registry=Registry(on_event=None),
        policy="REGISTRY_ONLY",
    )
    assert isinstance(d, Passthrough)


def test_vip_on_an_undeclared_port_is_unknown() -> None:
    d = outbound_decision(
        mesh(), "10.96.0.10", 81, registry=Registry(on_event=None), policy="REGISTRY_ONLY"
    )
    assert isinstance(d, Refuse)


def test_the_decision_module_imports_no_byte_mover() -> None:
    """Decide, then move bytes: the pure decision imports neither the relay, the HTTP proxy,
    sockets nor trio, so it can be read and tested without any of them."""
    import ast
    from pathlib import Path

    import nodeagent.proxy.outbound as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    }
    movers = ("nodeagent.proxy.relay", "nodeagent.http", "nodeagent.tunnel", "trio", "socket")
    assert not {m for m in imported if m.startswith(movers)}
