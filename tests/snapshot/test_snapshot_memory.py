"""What the snapshot keeps per resource, bounded: tracemalloc in a fresh interpreter per build
(nodeagent.bench.snapshot.retained_bytes), by difference, at a small scale.

Today (issue 22): ~860 B per workload, ~1,440 B per Service, before any endpoint list is looked
up; ~190 B per workload more once every list was. The bounds leave ~15 % of room: keeping the
raw documents again (~330 B per workload), building every endpoint list at publish, or a
second index entry per workload would each fail them.
"""

from __future__ import annotations

from nodeagent.bench.snapshot import retained_bytes

SERVICES, PER_SERVICE, NAMESPACES, NODES = 400, 5, 10, 10
WORKLOADS = SERVICES * PER_SERVICE


def test_bytes_per_workload_and_per_service_are_bounded() -> None:
    empty = retained_bytes(0, 0, NAMESPACES, NODES, False)
    services = retained_bytes(SERVICES, 0, NAMESPACES, NODES, False)
    mesh = retained_bytes(SERVICES, PER_SERVICE, NAMESPACES, NODES, False)
    in_use = retained_bytes(SERVICES, PER_SERVICE, NAMESPACES, NODES, False, True)
    per_service = (services - empty) / SERVICES
    per_workload = (mesh - services) / WORKLOADS
    per_workload_in_use = (in_use - services) / WORKLOADS
    assert 0 < per_service <= 1700, per_service
    assert 0 < per_workload <= 1000, per_workload
    # the endpoint records (2 service ports) come with the first lookup, not before
    assert per_workload + 100 < per_workload_in_use <= 1250, per_workload_in_use
