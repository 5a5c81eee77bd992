"""The node's balance Registry on the L4 path: `outbound_decision` returns the picked endpoint's
handle (policy from the DestinationRule, subsets of tcp routes), every endpoint ejected without
panic refuses with UH, and the L4 connection feedback (`outbound_path.L4Feedback`): maxConnections
refuses with UO, connect failures eject, a policy denial counts nothing. Fake clock, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_balance import FakeClock
from snapshot_docs import service, snapshot_of, workload

from nodeagent.balance import Registry
from nodeagent.proxy.connection import Denied
from nodeagent.proxy.outbound import Refuse, ToWorkload, outbound_decision
from nodeagent.proxy.outbound_path import L4Feedback
from nodeagent.snapshot import Snapshot
from nodeagent.tunnel import TunnelError

VIP = "10.96.0.10"


def _snapshot(traffic_policy: dict[str, Any]) -> Snapshot:
    pods = [workload(f"w{i}", f"10.0.1.{i}", {"app": "db"}, sa="db") for i in (1, 2, 3)]
    db = service("db", cluster_ip=VIP, port_name="tcp-db", port=5432, target=5432)
    rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"host": "db", "trafficPolicy": traffic_policy},
    }
    return snapshot_of([*pods, db, rule])


def _pick(snap: Snapshot, registry: Registry) -> ToWorkload:
    d = outbound_decision(snap, VIP, 5432, registry=registry, source_ip="10.0.9.9")
    assert isinstance(d, ToWorkload), d
    assert d.handle is not None
    return d


def test_round_robin_policy_applies_to_l4_connections_and_handles_track_in_flight() -> None:
    snap = _snapshot({"loadBalancer": {"simple": "ROUND_ROBIN"}})
    registry = Registry(now=FakeClock(), on_event=None)
    chosen = [_pick(snap, registry) for _ in range(9)]
    addresses = [d.address for d in chosen]
    assert sorted(set(addresses)) == ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
    assert all(addresses.count(a) == 3 for a in set(addresses))
    feedback = L4Feedback(chosen[0].handle)
    assert chosen[0].handle is not None
    assert chosen[0].handle.in_flight == 1
    feedback.connected()
    feedback.end()
    assert chosen[0].handle.in_flight == 0


def test_consistent_hash_on_source_ip_is_sticky_for_connections() -> None:
    snap = _snapshot({"loadBalancer": {"consistentHash": {"useSourceIp": True}}})
    registry = Registry(now=FakeClock(), on_event=None)
    assert len({_pick(snap, registry).address for _ in range(50)}) == 1


def test_max_connections_refuses_with_uo_and_frees_on_close() -> None:
    snap = _snapshot({"connectionPool": {"tcp": {"maxConnections": 2}}})
    registry = Registry(now=FakeClock(), on_event=None)
    open_ = [L4Feedback(_pick(snap, registry).handle) for _ in range(2)]
    with pytest.raises(Denied) as refused:
        L4Feedback(_pick(snap, registry).handle)
    assert refused.value.flag == "UO"
    open_[0].connected()
    open_[0].end()
    L4Feedback(_pick(snap, registry).handle)  # a slot was freed


def test_connect_failures_eject_and_policy_denials_do_not() -> None:
    clock = FakeClock()
    snap = _snapshot(
        {
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {"consecutiveGatewayErrors": 2, "maxEjectionPercent": 100},
        }
    )
    registry = Registry(now=clock, on_event=None)
    for _ in range(12):
        d = _pick(snap, registry)
        f = L4Feedback(d.handle)
        if d.address == "10.0.1.1":
            f.failed(TunnelError("connect_failed", "connect 10.0.1.1:15008: refused"))
        elif d.address == "10.0.1.2":
            f.failed(TunnelError("denied", "server 10.0.1.2:15008 refused: 403 denied"))
        else:
            f.connected()
        f.end()
    (cluster,) = registry.pickers()
    stats = {s["endpoint"]: s for s in cluster.statistics()["endpoints"]}
    assert stats["10.0.1.1:5432"]["ejected"]
    assert not stats["10.0.1.2:5432"]["ejected"]
    assert stats["10.0.1.2:5432"]["failures"] == 0


def test_all_ejected_without_panic_refuses_with_uh() -> None:
    snap = _snapshot(
        {
            "outlierDetection": {
                "consecutiveGatewayErrors": 1,
                "maxEjectionPercent": 100,
                "minHealthPercent": 0,
            }
        }
    )
    registry = Registry(now=FakeClock(), on_event=None)
    for _ in range(20):
        d = outbound_decision(snap, VIP, 5432, registry=registry)
        if isinstance(d, Refuse):
            break
        assert isinstance(d, ToWorkload)
        f = L4Feedback(d.handle)
        f.failed(OSError(111, "refused"))
        f.end()
    assert isinstance(d, Refuse)
    assert d.flag == "UH"
