"""The node's BalancedPicker on the L4 path: `outbound.decide` returns the picked endpoint's
handle (policy from the DestinationRule, subsets of tcp routes), every endpoint ejected without
panic refuses with UH, and the L4 connection feedback (`outbound_path.L4Feedback`): maxConnections
refuses with UO, connect failures eject, a policy denial counts nothing. Fake clock, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_balance import FakeClock
from snapshot_docs import snapshot_of

from nodeagent.balance import Registry
from nodeagent.proxy.connection import Denied
from nodeagent.proxy.outbound import BalancedPicker, Refuse, ToWorkload, decide
from nodeagent.proxy.outbound_path import L4Feedback
from nodeagent.snapshot import Snapshot
from nodeagent.store import keys
from nodeagent.tunnel import TunnelError

VIP = "10.96.0.10"


def _snapshot(traffic_policy: dict[str, Any]) -> Snapshot:
    docs: list[tuple[str, dict[str, Any]]] = []
    for i in (1, 2, 3):
        uid = f"w{i}"
        docs.append(
            (
                keys.workload("node-1", uid),
                {
                    "apiVersion": "mesh.nodeagent.io/v1alpha1",
                    "kind": "Workload",
                    "metadata": {
                        "name": f"pod-{uid}",
                        "namespace": "default",
                        "uid": uid,
                        "labels": {"app": "db"},
                        "annotations": {},
                    },
                    "spec": {
                        "node": "node-1",
                        "addresses": [f"10.0.1.{i}"],
                        "serviceAccount": "db",
                    },
                },
            )
        )
    for kind, spec in (
        (
            "Service",
            {
                "clusterIP": VIP,
                "selector": {"app": "db"},
                "ports": [{"name": "tcp-db", "port": 5432, "targetPort": 5432}],
            },
        ),
        ("DestinationRule", {"host": "db", "trafficPolicy": traffic_policy}),
    ):
        api = "v1" if kind == "Service" else "networking.istio.io/v1"
        docs.append(
            (
                keys.config(kind, "default", "db"),
                {
                    "apiVersion": api,
                    "kind": kind,
                    "metadata": {"name": "db", "namespace": "default"},
                    "spec": spec,
                },
            )
        )
    return snapshot_of(docs)


def _pick(snap: Snapshot, picker: BalancedPicker) -> ToWorkload:
    d = decide(snap, VIP, 5432, picker=picker, source_ip="10.0.9.9")
    assert isinstance(d, ToWorkload), d
    assert d.handle is not None
    return d


def test_round_robin_policy_applies_to_l4_connections_and_handles_track_in_flight() -> None:
    snap = _snapshot({"loadBalancer": {"simple": "ROUND_ROBIN"}})
    picker = BalancedPicker(Registry(now=FakeClock(), on_event=None))
    chosen = [_pick(snap, picker) for _ in range(9)]
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
    picker = BalancedPicker(Registry(now=FakeClock(), on_event=None))
    assert len({_pick(snap, picker).address for _ in range(50)}) == 1


def test_max_connections_refuses_with_uo_and_frees_on_close() -> None:
    snap = _snapshot({"connectionPool": {"tcp": {"maxConnections": 2}}})
    picker = BalancedPicker(Registry(now=FakeClock(), on_event=None))
    open_ = [L4Feedback(_pick(snap, picker).handle) for _ in range(2)]
    with pytest.raises(Denied) as refused:
        L4Feedback(_pick(snap, picker).handle)
    assert refused.value.flag == "UO"
    open_[0].connected()
    open_[0].end()
    L4Feedback(_pick(snap, picker).handle)  # a slot was freed


def test_connect_failures_eject_and_policy_denials_do_not() -> None:
    clock = FakeClock()
    snap = _snapshot(
        {
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {"consecutiveGatewayErrors": 2, "maxEjectionPercent": 100},
        }
    )
    picker = BalancedPicker(Registry(now=clock, on_event=None))
    for _ in range(12):
        d = _pick(snap, picker)
        f = L4Feedback(d.handle)
        if d.address == "10.0.1.1":
            f.failed(TunnelError("connect_failed", "connect 10.0.1.1:15008: refused"))
        elif d.address == "10.0.1.2":
            f.failed(TunnelError("denied", "server 10.0.1.2:15008 refused: 403 denied"))
        else:
            f.connected()
        f.end()
    (cluster,) = picker.registry.pickers()
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
    picker = BalancedPicker(Registry(now=FakeClock(), on_event=None))
    for _ in range(20):
        d = decide(snap, VIP, 5432, picker=picker)
        if isinstance(d, Refuse):
            break
        assert isinstance(d, ToWorkload)
        f = L4Feedback(d.handle)
        f.failed(OSError(111, "refused"))
        f.end()
    assert isinstance(d, Refuse)
    assert d.flag == "UH"
