"""Workload status: only Healthy workloads are service endpoints; Unhealthy ones stay known."""

from __future__ import annotations

from typing import Any

from helpers_snapshot import Docs
from snapshot_docs import key_of, service, workload

from nodeagent.snapshot import SnapshotBuilder
from nodeagent.store import keys


def _workload(uid: str, ip: str, status: str | None) -> dict[str, Any]:
    doc = workload(uid, ip, {"app": "web"})
    if status is not None:
        doc["status"] = {"health": status}
    return doc


def _build(*workloads: dict[str, Any]) -> tuple[Docs, SnapshotBuilder]:
    docs = Docs()
    kvs = [docs.config(service("web", {"app": "web"}, cluster_ip="10.96.0.10"))]
    kvs += [docs.stored(d) for d in workloads]
    return docs, SnapshotBuilder.build(kvs, docs.revision)


def _endpoint_ips(builder: SnapshotBuilder) -> list[str]:
    snap = builder.snapshot
    svc = snap.service("default", "web")
    assert svc is not None
    return [e.address for e in snap.endpoints(svc, 80)]


def test_unhealthy_workload_is_no_endpoint_but_stays_known() -> None:
    _, b = _build(
        _workload("a", "10.1.0.1", "Healthy"),
        _workload("b", "10.1.0.2", "Unhealthy"),
        _workload("c", "10.1.0.3", None),  # no status (meshctl apply, older agents): Healthy
    )
    assert not b.skipped()
    assert _endpoint_ips(b) == ["10.1.0.1", "10.1.0.3"]
    snap = b.snapshot
    unhealthy = snap.workload("b")
    assert unhealthy is not None
    assert unhealthy.status == "Unhealthy"
    assert snap.workload_by_ip("10.1.0.2") is unhealthy  # still found by address and uid
    svc = snap.service("default", "web")
    assert svc is not None
    assert snap.unhealthy_members(svc) == (unhealthy,)


def test_status_transitions_update_endpoints_incrementally() -> None:
    docs, b = _build(_workload("b", "10.1.0.2", "Unhealthy"))
    assert _endpoint_ips(b) == []
    doc = _workload("b", "10.1.0.2", "Healthy")
    b.apply([docs.put(key_of(doc), doc)])
    assert _endpoint_ips(b) == ["10.1.0.2"]
    svc = b.snapshot.service("default", "web")
    assert svc is not None
    assert b.snapshot.unhealthy_members(svc) == ()
    doc = _workload("b", "10.1.0.2", "Unhealthy")  # the certificate expired unrenewed
    b.apply([docs.put(key_of(doc), doc)])
    assert _endpoint_ips(b) == []


def test_unknown_status_rejects_only_that_document() -> None:
    _, b = _build(_workload("a", "10.1.0.1", "Healthy"), _workload("b", "10.1.0.2", "Sick"))
    assert _endpoint_ips(b) == ["10.1.0.1"]
    assert "status.health" in b.skipped()[keys.workload("node-1", "b")]
    assert "'Sick' is not Healthy or Unhealthy" in b.skipped()[keys.workload("node-1", "b")]
