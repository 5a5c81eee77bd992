"""Shared pieces of the kube tests: fixtures from tests/kube/fixtures, store waits, a client."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from nodeagent.kube.client import KubeClient, KubeConfig
from nodeagent.store import codec
from nodeagent.store.base import KeyValue, Store

FIXTURES = Path(__file__).parent / "fixtures"
TIMEOUT = 10.0


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


def service(name: str, ip: str, namespace: str = "bookinfo", **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(fixture("service"))
    doc["metadata"] = {"name": name, "namespace": namespace, "labels": {"app": name}}
    doc["spec"].update({"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name}, **spec})
    return doc


def memory_client(server: Any, nursery: trio.Nursery) -> KubeClient:
    return KubeClient(
        KubeConfig("http://kube.test"), timeout=5.0, connector=server.connector(nursery)
    )


async def wait_key(
    store: Store, key: str, predicate: Callable[[KeyValue | None], bool]
) -> KeyValue | None:
    """Wait (event-driven, through a store watch) until `predicate(store.get(key))` holds."""
    kvs, rev = await store.range(key)
    kv = next((k for k in kvs if k.key == key), None)
    if predicate(kv):
        return kv
    async with store.watch(key, start_revision=rev + 1) as batches:
        async for batch in batches:
            for event in batch:
                if event.kv.key != key:
                    continue
                kv = event.kv if event.type == "put" else None
                if predicate(kv):
                    return kv
    raise AssertionError("watch ended")


def present(kv: KeyValue | None) -> bool:
    return kv is not None


def absent(kv: KeyValue | None) -> bool:
    return kv is None


def body(kv: KeyValue | None) -> Any:
    assert kv is not None
    return codec.decode(kv)


async def until(predicate: Callable[[], bool], step: float = 0.1) -> None:
    """Wait for state the code under test exposes no event for (a count, a holder). Tests use
    it under autojump_clock, so the steps are virtual time, not real sleeps; callers bound it
    with trio.fail_after."""
    while not predicate():  # noqa: ASYNC110 - see the docstring
        await trio.sleep(step)
