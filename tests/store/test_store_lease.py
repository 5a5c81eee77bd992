"""hold_lease: renews at ttl/3, revokes on cancel, raises when the lease is lost."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nodeagent.store import LeaseNotFound, StoreUnavailable, open_store
from nodeagent.store.lease import hold_lease
from nodeagent.store.memory import MemoryStore


async def test_holds_then_revokes(autojump_clock: trio.testing.MockClock) -> None:
    store = await open_store("memory://")
    async with trio.open_nursery() as n:
        lease = await n.start(hold_lease, store, 9.0)
        await store.put("/node", b"", lease=lease)
        await trio.sleep(100)  # many TTLs: renewals kept it
        assert await store.get("/node") is not None
        n.cancel_scope.cancel()
    assert await store.get("/node") is None
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease)


async def test_lost_lease_raises(autojump_clock: trio.testing.MockClock) -> None:
    store = await open_store("memory://")
    with pytest.RaisesGroup(LeaseNotFound):
        async with trio.open_nursery() as n:
            lease = await n.start(hold_lease, store, 9.0)
            await store.revoke_lease(lease)  # someone else ends it
            await trio.sleep(100)


class FlakyStore(MemoryStore):
    """A memory store whose keep-alives fail while `down` (a fake for the retry logic)."""

    down = False

    async def keep_alive(self, lease: int) -> float:
        if self.down:
            raise StoreUnavailable("fake: down")
        return await super().keep_alive(lease)


async def test_transient_failures_are_retried(autojump_clock: trio.testing.MockClock) -> None:
    store = FlakyStore()
    async with trio.open_nursery() as n:
        lease = await n.start(hold_lease, store, 9.0)
        await store.put("/node", b"", lease=lease)
        store.down = True
        await trio.sleep(4)  # shorter than the TTL: retries bridge it
        store.down = False
        await trio.sleep(30)
        assert await store.get("/node") is not None
        n.cancel_scope.cancel()


async def test_outage_longer_than_ttl_loses_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyStore()
    store.down = False
    with pytest.RaisesGroup(LeaseNotFound):
        async with trio.open_nursery() as n:
            await n.start(hold_lease, store, 9.0)
            store.down = True
            await trio.sleep(100)
