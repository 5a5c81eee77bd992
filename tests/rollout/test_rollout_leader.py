"""Leader election through a store lease: one leader; the next takes over when it ends."""

from __future__ import annotations

import trio

from nodeagent.rollout.leader import StoreElection
from nodeagent.store import open_store


async def test_one_leads_and_the_other_takes_over_when_it_stops() -> None:
    store = await open_store("memory://")
    leading: list[str] = []
    try:
        a = StoreElection(store, name="t", identity="a", ttl=2.0, retry=0.05)
        b = StoreElection(store, name="t", identity="b", ttl=2.0, retry=0.05)

        def lead(who: str):  # type: ignore[no-untyped-def]
            async def work() -> None:
                leading.append(who)
                await trio.sleep_forever()

            return work

        scope_a = trio.CancelScope()

        async def run_a() -> None:
            with scope_a:
                await a.run(lead("a"))

        async with trio.open_nursery() as outer:
            outer.start_soon(run_a)
            with trio.fail_after(5):
                while not a.leading:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            outer.start_soon(b.run, lead("b"))
            with trio.fail_after(5):
                while b.attempts < 3:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert leading == ["a"]
            assert not b.leading
            assert (await b.holder())[0] == "a"
            scope_a.cancel()  # a stops: its lease is revoked, the key goes with it
            with trio.fail_after(5):
                while not b.leading:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert leading == ["a", "b"]
            outer.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_a_restart_with_the_same_identity_takes_its_own_key_at_once() -> None:
    store = await open_store("memory://")
    try:
        old = StoreElection(store, name="t", identity="ctl", ttl=30.0)
        lease = await store.grant_lease(30.0)
        assert await old.try_acquire(lease)
        new = StoreElection(store, name="t", identity="ctl", ttl=30.0)
        assert await new.try_acquire(await store.grant_lease(30.0))
        other = StoreElection(store, name="t", identity="other", ttl=30.0)
        assert not await other.try_acquire(await store.grant_lease(30.0))
    finally:
        await store.aclose()
