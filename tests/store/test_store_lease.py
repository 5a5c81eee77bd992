"""hold_lease: renews at ttl/3, revokes on cancel, raises when the lease is lost; and the
agent's options: reuse an earlier lease, be patient with the store (wait for the first lease,
call back for every lease held, replace a lost one at once), leave it on exit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from nodeagent.store import LeaseNotFound, Store, StoreUnavailable, open_store
from nodeagent.store.lease import LeaseCallback, hold_lease
from nodeagent.store.memory import MemoryStore

TTL = 9.0


@asynccontextmanager
async def holding(
    store: Store,
    *,
    reuse: int = 0,
    on_lease: LeaseCallback | None = None,
    revoke: bool = True,
) -> AsyncIterator[int]:
    """The lease a `hold_lease` of TTL seconds holds on `store` while the body runs (the holder
    is cancelled when it ends); what the holder raises comes out of here in a group."""
    hold = partial(hold_lease, store, TTL, reuse=reuse, on_lease=on_lease, revoke=revoke)
    async with trio.open_nursery() as n:
        yield await n.start(hold)
        n.cancel_scope.cancel()


class Granted(list[int]):
    """An `on_lease` that records the leases it is called back with, in order, each before
    awaiting `then(lease)` (which may fail the callback)."""

    def __init__(self, then: LeaseCallback | None = None) -> None:
        super().__init__()
        self.then = then

    async def __call__(self, lease: int) -> None:
        self.append(lease)
        if self.then is not None:
            await self.then(lease)


async def test_holds_then_revokes(autojump_clock: trio.testing.MockClock) -> None:
    store = await open_store("memory://")
    async with holding(store) as lease:
        await store.put("/node", b"", lease=lease)
        await trio.sleep(100)  # many TTLs: renewals kept it
        assert await store.get("/node") is not None
    assert await store.get("/node") is None
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease)


async def test_lost_lease_raises(autojump_clock: trio.testing.MockClock) -> None:
    store = await open_store("memory://")
    with pytest.RaisesGroup(LeaseNotFound):
        async with holding(store) as lease:
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
    async with holding(store) as lease:
        await store.put("/node", b"", lease=lease)
        store.down = True
        await trio.sleep(4)  # shorter than the TTL: retries bridge it
        store.down = False
        await trio.sleep(30)
        assert await store.get("/node") is not None


async def test_outage_longer_than_ttl_loses_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyStore()
    with pytest.RaisesGroup(LeaseNotFound):
        async with holding(store):
            store.down = True
            await trio.sleep(100)


# -- the options the agent uses: reuse, on_lease, revoke=False ------------------------------


async def test_reuses_a_live_lease_and_calls_back_with_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await open_store("memory://")
    old = await store.grant_lease(TTL)
    await store.put("/node", b"", lease=old)
    granted = Granted()
    async with holding(store, reuse=old, on_lease=granted) as lease:
        assert lease == old
        assert granted == [old]  # the caller puts its keys again under the same lease
        await trio.sleep(100)
        assert await store.get("/node") is not None
    assert granted == [old]


async def test_expired_reuse_grants_and_calls_back_before_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await open_store("memory://")
    gone = await store.grant_lease(TTL)
    await store.revoke_lease(gone)
    granted = Granted()
    async with holding(store, reuse=gone, on_lease=granted) as lease:
        assert granted == [lease]  # already called when started() returned
        assert lease != gone


async def test_lost_lease_is_replaced_and_keys_put_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await open_store("memory://")

    async def put_again(lease: int) -> None:
        await store.put("/node", str(lease).encode(), lease=lease)

    granted = Granted(then=put_again)
    async with holding(store, on_lease=granted) as first:
        await store.revoke_lease(first)  # the store forgets us: no LeaseNotFound raised now
        assert await store.get("/node") is None
        await trio.sleep(100)
        assert len(granted) == 2
        assert granted[0] == first
        kv = await store.get("/node")
        assert kv is not None
        assert kv.value == str(granted[1]).encode()


async def test_outage_longer_than_ttl_replaces_the_lease_once_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyGrantStore()
    granted: list[int] = []

    async def on_new(lease: int) -> None:
        if store.down:
            raise StoreUnavailable("fake: down")
        granted.append(lease)

    async with holding(store, on_lease=on_new) as first:
        store.down = True
        await trio.sleep(100)  # keep-alives and grants fail, nothing raises
        assert granted == [first]
        store.down = False
        back = trio.current_time()
        while len(granted) < 2:  # noqa: ASYNC110 (the fake store has no change event)
            await trio.sleep(0.01)
        # Asked again about once a second while the store did not answer: keys are back soon.
        assert trio.current_time() - back <= 1.5
        assert granted[1] != first
        await trio.sleep(100)  # and the new lease is renewed
        await store.keep_alive(granted[1])


async def test_outage_keeps_a_lease_the_store_still_has(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyStore()
    granted = Granted()
    async with holding(store, on_lease=granted) as lease:
        await store.put("/node", b"", lease=lease)
        store.down = True
        for _ in range(20):  # the store keeps the lease alive meanwhile (etcd does on restart)
            await trio.sleep(5)
            await MemoryStore.keep_alive(store, lease)
        store.down = False
        await trio.sleep(30)
        assert granted == [lease]  # not replaced: the keys stayed where they were
        assert await store.get("/node") is not None


async def test_failed_callback_is_retried_while_the_lease_is_renewed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await open_store("memory://")

    async def fail_for_several_ttls(lease: int) -> None:
        if 1 < len(calls) < 200:  # the replacement's callback fails
            raise StoreUnavailable("fake: put failed")

    calls = Granted(then=fail_for_several_ttls)
    async with holding(store, on_lease=calls) as first:
        await store.revoke_lease(first)
        await trio.sleep(200)
        assert len(calls) == 200
        second = calls[1]
        assert second != first
        assert set(calls[1:]) == {second}
        await store.keep_alive(second)


async def test_store_error_in_the_first_callback_is_retried_before_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await open_store("memory://")

    async def fail_four_times(lease: int) -> None:
        if len(calls) < 5:
            raise StoreUnavailable("fake: cannot save")

    calls = Granted(then=fail_four_times)
    async with holding(store, on_lease=calls) as lease:
        assert calls == [lease] * 5


async def test_other_errors_in_the_first_callback_fail_the_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await open_store("memory://")

    async def on_new(lease: int) -> None:
        raise ValueError("a bug, not the store")

    with pytest.RaisesGroup(ValueError):
        async with holding(store, on_lease=on_new):
            pass  # not reached: the start fails


async def test_patient_holder_waits_for_a_store_that_does_not_answer_at_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyGrantStore()
    old = await store.grant_lease(TTL)
    store.down = True
    granted = Granted()
    started: list[int] = []

    async def holder() -> None:
        started.append(await n.start(partial(hold_lease, store, TTL, reuse=old, on_lease=granted)))

    async with trio.open_nursery() as n:
        n.start_soon(holder)
        await trio.sleep(6)  # within the old lease's TTL (the memory store ages it on this clock)
        assert started == granted == []  # still asking, not failed
        store.down = False
        await trio.sleep(1.5)
        assert started == granted == [old]  # reused, and called back with it
        n.cancel_scope.cancel()


async def test_plain_holder_fails_at_once_when_the_store_does_not_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyGrantStore()
    store.down = True
    with pytest.RaisesGroup(StoreUnavailable):
        async with holding(store):
            pass  # not reached: the start fails


async def test_revoke_false_leaves_the_lease_for_the_next_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await open_store("memory://")
    async with holding(store, revoke=False) as lease:
        await store.put("/node", b"", lease=lease)
    assert await store.get("/node") is not None
    async with holding(store, reuse=lease, revoke=False) as again:
        assert again == lease


class FlakyGrantStore(FlakyStore):
    """Keep-alives and grants both fail while `down` (a fake for the replacement loop)."""

    async def grant_lease(self, ttl: float) -> int:
        if self.down:
            raise StoreUnavailable("fake: down")
        return await super().grant_lease(ttl)
