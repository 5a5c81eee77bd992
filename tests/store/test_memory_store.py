"""The memory backend beyond the contract: trio-clock leases, named sharing, retention."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nodeagent.store import CompactedError, Store, StoreError, open_store
from nodeagent.store.memory import MemoryStore


async def first_batch(store: Store, prefix: str, start: int) -> list[str]:
    async with store.watch(prefix, start_revision=start) as events:
        async for batch in events:
            return [f"{e.type} {e.kv.key}" for e in batch]
    raise AssertionError("watch ended")


async def test_lease_expires_by_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    store = await open_store("memory://")
    lease = await store.grant_lease(30)
    rev = await store.put("/n/1", b"", lease=lease)
    t0 = trio.current_time()
    # the watcher wakes itself at the lease deadline: nobody else touches the store
    assert await first_batch(store, "/n/", rev + 1) == ["delete /n/1"]
    assert trio.current_time() - t0 == pytest.approx(30)
    await store.aclose()


async def test_keep_alive_extends(autojump_clock: trio.testing.MockClock) -> None:
    store = await open_store("memory://")
    lease = await store.grant_lease(10)
    await store.put("/k", b"", lease=lease)
    for _ in range(5):
        await trio.sleep(8)
        assert await store.keep_alive(lease) == 10
    assert await store.get("/k") is not None
    await trio.sleep(10)
    assert await store.get("/k") is None
    await store.aclose()


async def test_named_stores_share_state() -> None:
    a = await open_store("memory://shared-test")
    b = await open_store("memory://shared-test")
    fresh = await open_store("memory://")
    await a.put("/k", b"v")
    kv = await b.get("/k")
    assert kv is not None
    assert kv.value == b"v"
    assert await fresh.get("/k") is None
    for s in (a, b, fresh):
        await s.aclose()


async def test_retention_compacts_old_history() -> None:
    store = MemoryStore(retention=8)
    first = await store.put("/k", b"0")
    for i in range(30):
        await store.put("/k", str(i).encode())
    with pytest.raises(CompactedError) as info:
        await first_batch(store, "/", first)
    assert info.value.compact_revision > first
    assert await first_batch(store, "/", store.revision) == ["put /k"]


async def test_watch_ends_with_error_when_store_closes() -> None:
    store = await open_store("memory://")
    with pytest.RaisesGroup(pytest.RaisesExc(StoreError, match="closed")):
        async with trio.open_nursery() as n:
            n.start_soon(first_batch, store, "/", 0)
            await trio.testing.wait_all_tasks_blocked()
            await store.aclose()
