"""The controller over a real memory store, with a scripted metrics source and a hand clock.

The sandbox tests (tests/integration/test_rollouts.py) run the same controller against real
agents and traffic; these pin the store side: one transaction per move, resume after a restart,
nothing written during a store outage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from rollout_docs import CANARY, MESH, Traffic, documents, rollout_yaml

from nodeagent.config.apply import apply_documents
from nodeagent.rollout.controller import Controller
from nodeagent.rollout.leader import StoreElection
from nodeagent.rollout.sources import Reading, SourceError
from nodeagent.rollout.status import list_statuses, read_status
from nodeagent.rollout.windows import read_windows
from nodeagent.store import Store, StoreUnavailable, keys, open_store
from nodeagent.store.codec import decode
from nodeagent.store.forwarding import ForwardingStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """Serves the traffic's counters; `fail` makes a reading fail."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.fail = False
        self.reads = 0

    async def read(self) -> Reading:
        self.reads += 1
        if self.fail:
            raise SourceError("agent n1: connect: refused")
        return self.traffic.reading()


class Flaky(ForwardingStore):
    down = False

    async def txn(self, compares, success, failure=()):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailable("sqlite: database is locked")
        return await self.inner.txn(compares, success, failure)

    async def get(self, key):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailable("sqlite: database is locked")
        return await self.inner.get(key)


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    s = await open_store("memory://")
    await apply_documents(s, documents(MESH + "---\n" + rollout_yaml(CANARY)))
    try:
        yield s
    finally:
        await s.aclose()


async def route(store: Store) -> list[tuple[str, int | None]]:
    kv = await store.get(keys.config("VirtualService", "default", "my-app"))
    assert kv is not None
    return [
        (d["destination"]["subset"], d.get("weight"))
        for d in decode(kv)["spec"]["http"][0]["route"]
    ]


async def interval(
    c: Controller, clock: Clock, traffic: Traffic, weight: int, bad: int = 0
) -> None:
    """One interval of 100 requests split by `weight`, then a reconciliation."""
    traffic.serve("v2.0.0", weight - bad)
    traffic.serve("v2.0.0", bad, code="500")
    traffic.serve("v1.0.0", 100 - weight)
    clock.now += 2.0
    await c.reconcile_all()


async def test_a_healthy_rollout_moves_weights_in_the_store_and_promotes(store: Store) -> None:
    clock, traffic = Clock(), Traffic()
    c = Controller(store, Scripted(traffic), clock=clock)
    await c.reconcile_all()  # new run: Initializing
    status = await read_status(store, "default", "my-app")
    assert status is not None
    assert status.phase == "Initializing"
    await c.reconcile_all()  # first step
    assert await route(store) == [("v1", 80), ("v2", 20)]
    for weight, expect in ((20, 40), (40, 60)):
        await interval(c, clock, traffic, weight)
        assert await route(store) == [("v1", 100 - expect), ("v2", expect)]
    await interval(c, clock, traffic, 60)
    await c.reconcile_all()
    assert await route(store) == [("v2", None)]
    status = await read_status(store, "default", "my-app")
    assert status is not None
    assert status.phase == "Succeeded"
    assert [h["weight"] for h in status.history] == [20, 40, 60, 60]
    windows = await read_windows(store, "default", "my-app", "my-app")
    assert [w.subsets["v2"].requests for w in windows.windows] == [20, 40, 60]
    assert [s.ref for s in await list_statuses(store)] == ["default/my-app"]


async def test_a_restarted_controller_resumes_at_the_recorded_step(store: Store) -> None:
    clock, traffic = Clock(), Traffic()
    first = Controller(store, Scripted(traffic), clock=clock)
    await first.reconcile_all()
    await first.reconcile_all()
    await interval(first, clock, traffic, 20)
    assert await route(store) == [("v1", 60), ("v2", 40)]
    second = Controller(store, Scripted(traffic), clock=clock)  # no memory of the first
    await second.reconcile_all()  # takes its baseline
    status = await read_status(store, "default", "my-app")
    assert status is not None
    assert (status.phase, status.weight) == ("Progressing", 40)
    await interval(second, clock, traffic, 40)
    assert await route(store) == [("v1", 40), ("v2", 60)]


async def test_bad_metrics_roll_back_and_say_why(store: Store) -> None:
    clock, traffic = Clock(), Traffic()
    c = Controller(store, Scripted(traffic), clock=clock)
    await c.reconcile_all()
    await c.reconcile_all()
    await interval(c, clock, traffic, 20, bad=2)
    await interval(c, clock, traffic, 20, bad=2)
    assert await route(store) == [("v1", None)]
    status = await read_status(store, "default", "my-app")
    assert status is not None
    assert status.phase == "Failed"
    assert "success rate 90.00% < 99%" in status.reason


async def test_a_store_outage_writes_nothing_and_the_rollout_continues_after(store: Store) -> None:
    clock, traffic = Clock(), Traffic()
    flaky = Flaky(store)
    c = Controller(flaky, Scripted(traffic), clock=clock)
    await c.reconcile_all()
    await c.reconcile_all()
    before = await store.range(keys.ROOT)
    flaky.down = True
    traffic.serve("v2.0.0", 20)
    traffic.serve("v1.0.0", 80)
    clock.now += 2.0
    with pytest.raises(StoreUnavailable):
        await c.reconcile_all()
    assert (await store.range(keys.ROOT))[1] == before[1]  # not one revision more
    flaky.down = False
    await c.reconcile_all()
    assert await route(store) == [("v1", 60), ("v2", 40)]


async def test_unreadable_metrics_count_as_a_failed_check(store: Store) -> None:
    clock, traffic = Clock(), Traffic()
    source = Scripted(traffic)
    c = Controller(store, source, clock=clock)
    await c.reconcile_all()
    await c.reconcile_all()
    source.fail = True
    clock.now += 2.0
    await c.reconcile_all()
    status = await read_status(store, "default", "my-app")
    assert status is not None
    assert status.failed_checks == 1
    assert "metrics: agent n1: connect: refused" in status.reason


async def test_a_deleted_rollouts_status_and_windows_go_with_it(store: Store) -> None:
    clock, traffic = Clock(), Traffic()
    c = Controller(store, Scripted(traffic), clock=clock)
    await c.reconcile_all()
    await c.reconcile_all()
    await interval(c, clock, traffic, 20)
    assert await read_status(store, "default", "my-app") is not None
    await store.delete(keys.config("Rollout", "default", "my-app"))
    await c.reconcile_all()
    assert await read_status(store, "default", "my-app") is None
    assert (await read_windows(store, "default", "my-app", "my-app")).windows == ()


async def test_a_failing_pre_rollout_gate_is_retried_each_interval_then_rolls_back() -> None:
    store = await open_store("memory://")
    try:
        gate = "    webhooks:\n    - {name: smoke, type: pre-rollout, url: 'http://127.0.0.1:1/'}\n"
        await apply_documents(store, documents(MESH + "---\n" + rollout_yaml(CANARY + gate)))
        clock, traffic = Clock(), Traffic()
        c = Controller(store, Scripted(traffic), clock=clock)
        await c.reconcile_all()  # Initializing
        await c.reconcile_all()  # the gate fails: check 1 of 2
        await c.reconcile_all()  # not again within the interval
        status = await read_status(store, "default", "my-app")
        assert status is not None
        assert (status.phase, status.failed_checks) == ("Initializing", 1)
        assert "webhook smoke: POST http://127.0.0.1:1/" in status.reason
        clock.now += 2.0
        await c.reconcile_all()
        status = await read_status(store, "default", "my-app")
        assert status is not None
        assert (status.phase, status.failed_checks) == ("Failed", 2)
        assert await route(store) == [("v1", None)]
    finally:
        await store.aclose()


async def test_a_deposed_leaders_writes_do_not_land(store: Store) -> None:
    election = StoreElection(store, name="rollout-controller", identity="old")
    assert await election.try_acquire(await store.grant_lease(30.0))
    assert election.fence is not None
    clock, traffic = Clock(), Traffic()
    c = Controller(store, Scripted(traffic), clock=clock, fence=lambda: election.fence)
    await c.reconcile_all()
    assert await read_status(store, "default", "my-app") is not None  # leading: it writes
    # Another leader took the key over (the old one's lease expired meanwhile).
    successor = StoreElection(store, name="rollout-controller", identity="new")
    await store.delete(election.key)
    assert await successor.try_acquire(await store.grant_lease(30.0))
    before = (await store.range(keys.ROOT))[1]
    await c.reconcile_all()  # the old one's next move
    assert (await store.range(keys.ROOT))[1] == before
    assert c.moves == 1
