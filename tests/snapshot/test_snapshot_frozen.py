"""The compact read-only containers (frozen.py, endpoints.py) behave as the mappings they stand
for: equal to dicts with the same items, unchangeable, built once."""

from __future__ import annotations

import pickle

import pytest
from helpers_snapshot import Docs
from snapshot_docs import service, workload

from nodeagent.snapshot import SnapshotBuilder
from nodeagent.snapshot.endpoints import ServiceEndpoints
from nodeagent.snapshot.frozen import FrozenDict, PortMap, share


def test_frozen_dict_is_a_read_only_hashable_dict() -> None:
    labels = FrozenDict({"app": "web", "version": "v1"})
    assert labels == {"version": "v1", "app": "web"}
    assert hash(labels) == hash(FrozenDict({"version": "v1", "app": "web"}))
    assert share(FrozenDict({"app": "web", "version": "v1"})) is share(labels)
    for change in (
        lambda: labels.__setitem__("x", "y"),
        lambda: labels.update(x="y"),
        lambda: labels.pop("app"),
        lambda: labels.clear(),
        lambda: labels.setdefault("x", "y"),
        lambda: labels.__delitem__("app"),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert labels == {"app": "web", "version": "v1"}
    assert pickle.loads(pickle.dumps(labels)) == labels


def test_port_map_is_a_mapping() -> None:
    ports = PortMap((80, 9090), ("a", "b"))
    assert ports == {80: "a", 9090: "b"}
    assert dict(ports) == {80: "a", 9090: "b"}
    assert ports.get(80) == "a"
    assert ports.get(81) is None
    assert ports[9090] == "b"
    with pytest.raises(KeyError):
        ports[81]
    assert PortMap((9090, 80), ("b", "a")) == ports  # order does not matter


def test_endpoint_lists_are_built_on_first_lookup_and_kept() -> None:
    d = Docs()
    kvs = [d.config(service("web", {"app": "web"}, cluster_ip="10.96.0.1"))]
    kvs += [d.stored(workload(f"w{i}", f"10.0.0.{i + 1}", {"app": "web"})) for i in range(3)]
    snap = SnapshotBuilder.build(kvs, d.revision).snapshot
    svc = snap.service("default", "web")
    assert svc is not None
    entry = snap.indexes.endpoints[("Service", "default", "web")]
    assert isinstance(entry, ServiceEndpoints)
    assert entry.total() == 3
    assert entry._built is None  # nothing made before a lookup
    first = snap.endpoints(svc, 80)
    assert [(e.address, e.port) for e in first] == [(f"10.0.0.{i}", 8080) for i in (1, 2, 3)]
    assert snap.endpoints(svc, 80) is first  # made once
    assert snap.endpoints(svc, 81) == ()
    assert dict(entry) == {80: first}
