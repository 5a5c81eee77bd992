"""The store tests' real etcd: `nodeagent.sandbox.etcd`'s loopback clusters with fast elections
(the failover test stays short). A missing binary or a member that does not start is an
`EtcdError` naming it, so the test errors; it is never skipped."""

from __future__ import annotations

from nodeagent.sandbox.etcd import FAST_ELECTIONS, EtcdCluster, free_port
from nodeagent.sandbox.etcd import start_cluster as _start_cluster

__all__ = ["EtcdCluster", "free_port", "start_cluster"]


def start_cluster(
    size: int, *, scheme: str = "http", extra: list[str] | None = None
) -> EtcdCluster:
    return _start_cluster(
        size, scheme=scheme, extra=[*FAST_ELECTIONS, *(extra or [])], prefix="etcd-test-"
    )
