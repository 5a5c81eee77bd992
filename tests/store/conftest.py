"""Fixtures for the store tests: real etcd servers and the store parametrized over backends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from etcd_procs import EtcdCluster, start_cluster

from nodeagent.store import Store, open_store


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdCluster]:
    """One real etcd for the whole session; tests isolate themselves by key prefix."""
    cluster = start_cluster(1)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster (the failover test kills members of it)."""
    cluster = start_cluster(3)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ns() -> str:
    """A key prefix of this test's own (the etcd server is shared by the session)."""
    return f"/test/{uuid.uuid4().hex[:12]}/"


BACKENDS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("etcd", marks=pytest.mark.etcd),
]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite://{tmp_path}/store/mesh.db"
    cluster: EtcdCluster = request.getfixturevalue("etcd_server")
    return cluster.url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = await open_store(store_url)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
def backend(store_url: str) -> str:
    return store_url.split(":", 1)[0]


def ttl_for(backend: str) -> float:
    """A short lease TTL the backend honours (etcd rounds up to whole seconds, minimum 2)."""
    return 2.0 if backend == "etcd" else 0.6


@pytest.fixture
def short_ttl(backend: str) -> float:
    return ttl_for(backend)
