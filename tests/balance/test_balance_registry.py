"""The registry against real snapshots: cache, rebuild on change, state kept by address."""

from __future__ import annotations

import os
import random
from typing import Any

from helpers_balance import FakeClock
from snapshot_docs import key_of, service, workload
from structlog.testing import capture_logs

from nodeagent.balance import (
    ConnectionToken,
    Outcome,
    OutlierEvent,
    Overflow,
    Registry,
    cluster_name,
)
from nodeagent.balance.shared import SharedCounts
from nodeagent.snapshot import Snapshot, SnapshotBuilder
from nodeagent.snapshot.model import Service
from nodeagent.store import codec, keys
from nodeagent.store.base import Event, KeyValue


class Mesh:
    def __init__(self) -> None:
        self.rev = 0
        self.builder = SnapshotBuilder()

    def _kv(self, key: str, doc: Any) -> KeyValue:
        self.rev += 1
        return KeyValue(key, codec.encode(doc), self.rev, self.rev, 1)

    def put(self, key: str, doc: Any) -> Snapshot:
        return self.builder.apply([Event("put", self._kv(key, doc))], revision=self.rev)

    def delete(self, key: str) -> Snapshot:
        self.rev += 1
        return self.builder.apply(
            [Event("delete", KeyValue(key, b"", 0, self.rev, 0))], revision=self.rev
        )

    def pod(self, n: int, version: str = "v1") -> Snapshot:
        doc = workload(f"uid-{n}", f"10.1.0.{n}", {"app": "web", "version": version},
                       name=f"web-{n}", sa="web")  # fmt: skip
        return self.put(key_of(doc), doc)

    def service(self) -> Snapshot:
        doc = service("web", cluster_ip="10.96.0.10")
        return self.put(key_of(doc), doc)

    def rule(self, policy: dict[str, Any]) -> Snapshot:
        doc = {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "host": "web",
                "trafficPolicy": policy,
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {
                        "name": "v2",
                        "labels": {"version": "v2"},
                        "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
                    },
                ],
            },
        }
        return self.put(keys.config("DestinationRule", "default", "web"), doc)


def _svc(snap: Snapshot) -> Service:
    svc = snap.service("default", "web")
    assert svc is not None
    return svc


def test_picker_cached_rebuilt_and_state_kept() -> None:
    mesh = Mesh()
    mesh.service()
    for n in (1, 2):
        mesh.pod(n)
    snap = mesh.pod(3, "v2")
    clock = FakeClock()
    reg = Registry(now=clock, rng=random.Random(1), on_event=None)
    p = reg.picker_for(snap, _svc(snap), None, 80)
    assert p.cluster == "outbound|80||web.default.svc.cluster.local"
    assert p.balancer.kind == "PEAK_EWMA"
    assert sorted(s.key for s in p.states) == ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]
    assert reg.picker_for(snap, _svc(snap), None, 80) is p
    # An unrelated change: a new snapshot, the same endpoints and policy → the same picker.
    other = mesh.put(
        keys.config("Service", "default", "other"),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "other"}, "spec": {}},
    )
    assert reg.picker_for(other, _svc(other), None, 80) is p
    assert reg.rebuilds == 1
    # A new pod: a new picker that keeps the old per-address state.
    s1 = p.state("10.1.0.1", 8080)
    assert s1 is not None
    s1.start()
    grown = mesh.pod(4)
    q = reg.picker_for(grown, _svc(grown), None, 80)
    assert q is not p
    assert len(q.states) == 4
    assert q.state("10.1.0.1", 8080) is s1
    assert s1.in_flight == 1
    # Subsets come from the DestinationRule, with the subset's policy.
    ruled = mesh.rule({"loadBalancer": {"simple": "ROUND_ROBIN"}})
    v1 = reg.picker_for(ruled, _svc(ruled), "v1", 80)
    v2 = reg.picker_for(ruled, _svc(ruled), "v2", 80)
    assert sorted(s.address for s in v1.states) == ["10.1.0.1", "10.1.0.2", "10.1.0.4"]
    assert [s.address for s in v2.states] == ["10.1.0.3"]
    assert (v1.balancer.kind, v2.balancer.kind) == ("ROUND_ROBIN", "RANDOM")
    assert reg.picker_for(ruled, _svc(ruled), None, 80).balancer.kind == "ROUND_ROBIN"
    assert reg.picker_for(ruled, _svc(ruled), "nope", 80).states == []


def test_policy_change_keeps_ejections_and_breaker() -> None:
    mesh = Mesh()
    mesh.service()
    mesh.pod(1)
    mesh.pod(2)
    od = {"consecutive5xxErrors": 1, "maxEjectionPercent": 100, "baseEjectionTime": "30s"}
    snap = mesh.rule({"outlierDetection": od, "connectionPool": {"tcp": {"maxConnections": 1}}})
    clock = FakeClock()
    events: list[OutlierEvent] = []
    reg = Registry(now=clock, rng=random.Random(1), on_event=events.append)
    p = reg.picker_for(snap, _svc(snap), None, 80)
    bad = p.state("10.1.0.1", 8080)
    assert bad is not None
    bad.start()
    bad.finish(0.01, Outcome.from_status(500))
    assert bad.ejected
    assert events[0].kind == "ejected"
    assert events[0].cluster == cluster_name(_svc(snap), None, 80)
    token = p.breaker.try_acquire_connection()
    changed = mesh.rule(
        {
            "loadBalancer": {"simple": "LEAST_REQUEST"},
            "outlierDetection": od,
            "connectionPool": {"tcp": {"maxConnections": 2}},
        }
    )
    q = reg.picker_for(changed, _svc(changed), None, 80)
    assert q is not p
    assert q.balancer.kind == "LEAST_REQUEST"
    assert q.state("10.1.0.1", 8080) is bad
    assert bad.ejected
    assert {q.pick().address for _ in range(50)} == {"10.1.0.2"}
    assert q.breaker is p.breaker
    assert q.breaker.active["connections"] == 1
    assert q.breaker.limits.max_connections == 2
    del token
    # Readmission without traffic, by the registry's maintenance call.
    clock.advance(40.0)
    assert [e.kind for e in reg.maintain()] == ["readmitted"]
    assert not bad.ejected
    # Removing outlier detection readmits everyone at once.
    bad.start()
    bad.finish(0.01, Outcome.GATEWAY_ERROR)
    assert bad.ejected
    plain = mesh.rule({})
    r = reg.picker_for(plain, _svc(plain), None, 80)
    assert r.outlier is None
    assert not bad.ejected


def test_invalid_policy_falls_back_to_defaults() -> None:
    mesh = Mesh()
    mesh.service()
    mesh.pod(1)
    # The validator would refuse this; a document written around it must not stop traffic.
    snap = mesh.rule({"outlierDetection": {"interval": "sometimes"}})
    reg = Registry(now=FakeClock(), rng=random.Random(1))
    with capture_logs() as logs:
        p = reg.picker_for(snap, _svc(snap), None, 80)
    assert p.policy.outlier is None
    assert p.pick().address == "10.1.0.1"
    (line,) = logs
    assert line["event"] == "balance.policy_invalid"
    assert "trafficPolicy.outlierDetection.interval" in line["error"]
    assert line["rule"] == "default/web"


def test_prune_and_bound() -> None:
    mesh = Mesh()
    snap = mesh.service()
    reg = Registry(now=FakeClock(), max_clusters=2)
    svc = _svc(snap)
    for port in (80, 81, 82):
        reg.picker_for(snap, svc, None, port)
    assert reg.statistics()["clusters"] == 2
    gone = mesh.delete(keys.config("Service", "default", "web"))
    assert reg.prune(gone) == 2
    assert reg.statistics()["clusters"] == 0


def test_the_registries_of_two_workers_share_each_clusters_breaker() -> None:
    mesh = Mesh()
    mesh.service()
    mesh.pod(1)
    snap = mesh.rule({"connectionPool": {"tcp": {"maxConnections": 1}}})
    table = SharedCounts.create(2, slots=8)
    w0, w1 = (SharedCounts.attach(os.dup(table.fd), i) for i in (0, 1))
    r0, r1 = Registry(on_event=None, shared=w0), Registry(on_event=None, shared=w1)
    p0, p1 = r0.picker_for(snap, _svc(snap), None, 80), r1.picker_for(snap, _svc(snap), None, 80)
    held = p0.breaker.try_acquire_connection()
    assert isinstance(held, ConnectionToken)
    assert isinstance(p1.breaker.try_acquire_connection(), Overflow)
    # Another port is another cluster; a rebuilt picker keeps its breaker and so its slot.
    assert isinstance(r1.picker_for(snap, _svc(snap), None, 81).breaker.try_acquire_connection(),
                      ConnectionToken)  # fmt: skip
    grown = mesh.pod(2)
    q1 = r1.picker_for(grown, _svc(grown), None, 80)
    assert q1 is not p1
    assert q1.breaker is p1.breaker
    assert isinstance(q1.breaker.try_acquire_connection(), Overflow)
    held.release()
    assert isinstance(q1.breaker.try_acquire_connection(), ConnectionToken)
    for t in (w0, w1, table):
        t.close()


def test_an_ejection_in_one_worker_is_adopted_by_another() -> None:
    mesh = Mesh()
    for n in (1, 2, 3):
        mesh.pod(n)
    mesh.service()
    od = {"consecutive5xxErrors": 2, "maxEjectionPercent": 34, "baseEjectionTime": "10s"}
    snap = mesh.rule({"outlierDetection": od})
    clock = FakeClock()
    events: list[OutlierEvent] = []
    a = Registry(now=clock, rng=random.Random(1), on_event=events.append)
    b = Registry(now=clock, rng=random.Random(2), on_event=events.append)
    pa, pb = (r.picker_for(snap, _svc(snap), None, 80) for r in (a, b))
    bad = pa.state("10.1.0.1", 8080)
    assert bad is not None
    for _ in range(2):
        bad.start()
        bad.finish(0.01, Outcome.from_status(503))
    (ejected,) = events
    assert (ejected.kind, ejected.endpoint, ejected.backoff) == ("ejected", "10.1.0.1:8080", 1)
    # What the worker sends to the control, and the control to every other worker:
    assert b.adopt_ejection(ejected.cluster, ejected.endpoint, ejected.backoff) == 1
    assert {pb.pick().address for _ in range(60)} == {"10.1.0.2", "10.1.0.3"}
    assert b.adopt_ejection(ejected.cluster, ejected.endpoint, ejected.backoff) == 0  # already
    assert b.adopt_ejection("outbound|80||other", ejected.endpoint, 1) == 0
    # maxEjectionPercent 34 of 3: one ejected at most, adopted or not.
    assert b.adopt_ejection(ejected.cluster, "10.1.0.2:8080", 1) == 0
    assert len(events) == 1  # an adopted ejection is the ejecting worker's to log
    # Readmitted by b's own sweep after the same ejection time (10 s x backoff 1).
    clock.advance(9.0)
    assert b.maintain() == []
    clock.advance(2.0)
    assert [(e.kind, e.endpoint) for e in b.maintain()] == [("readmitted", "10.1.0.1:8080")]
    assert {pb.pick().address for _ in range(60)} == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
    # A second ejection doubles the time, in the adopting worker too.
    assert b.adopt_ejection(ejected.cluster, ejected.endpoint, 2) == 1
    clock.advance(15.0)
    assert b.maintain() == []
    clock.advance(6.0)
    assert [e.kind for e in b.maintain()] == ["readmitted"]
