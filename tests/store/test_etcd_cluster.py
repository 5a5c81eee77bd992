"""etcd failover: a 3-member cluster loses its leader while a writer and a watcher stream.

The watcher must see every acknowledged write exactly once and in order, with the client failing
over to the surviving members for both the writes and the watch.
"""

from __future__ import annotations

import time

import pytest
import trio
from etcd_procs import EtcdCluster

from nodeagent.store import Event, StoreUnavailable, open_store
from nodeagent.store.etcd import EtcdStore

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

WRITES = 300
KILL_AT = 100


async def find_leader(cluster: EtcdCluster) -> int:
    probe = await open_store(cluster.url)
    assert isinstance(probe, EtcdStore)
    try:
        ids = []
        leader = None
        for i in range(len(cluster.members)):
            status = await probe.status(i)
            ids.append(int(status["header"]["member_id"]))
            leader = int(status["leader"])
        assert leader in ids, f"no agreed leader: {leader} not in {ids}"
        return ids.index(leader)
    finally:
        await probe.aclose()


async def test_leader_loss_mid_stream(etcd_cluster: EtcdCluster) -> None:
    leader = await find_leader(etcd_cluster)
    members = etcd_cluster.members
    # the leader first, so that both the writer and the watcher are on it when it dies
    order = [members[leader]] + [m for i, m in enumerate(members) if i != leader]
    url = "etcd://" + ",".join(m.endpoint for m in order) + "?timeout=2"
    store = await open_store(url)
    prefix = "/failover/"
    acked: dict[bytes, int] = {}
    unknown: set[bytes] = set()
    seen: list[Event] = []
    start = await store.put("/failover-start", b"")
    done = trio.Event()
    kill_time = 0.0

    async def watcher() -> None:
        async with store.watch(prefix, start_revision=start + 1) as events:
            async for batch in events:
                seen.extend(batch)
                if any(e.kv.key == prefix + "done" for e in batch):
                    done.set()
                    return

    async def writer() -> None:
        nonlocal kill_time
        for i in range(WRITES):
            value = b"%d" % i
            if i == KILL_AT:
                kill_time = time.monotonic()
                await trio.to_thread.run_sync(members[leader].kill)
            try:
                acked[value] = await store.put(prefix + f"k{i % 7}", value)
            except StoreUnavailable:
                unknown.add(value)  # the write's outcome is unknown: allowed either way
        for _ in range(20):
            try:
                await store.put(prefix + "done", b"done")
                return
            except StoreUnavailable:
                await trio.sleep(0.2)
        raise AssertionError("no write got through after the failover")

    t0 = time.monotonic()
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher)
                await trio.sleep(0.1)  # let the watch attach to the leader first
                nursery.start_soon(writer)
                await done.wait()
    finally:
        await store.aclose()
    elapsed = time.monotonic() - t0

    values = [e.kv.value for e in seen if e.kv.key != prefix + "done"]
    revisions = [e.kv.mod_revision for e in seen]
    assert revisions == sorted(set(revisions)), "events out of order or repeated"
    assert all(e.type == "put" for e in seen)
    # every acknowledged write exactly once, at the revision the put returned
    for value in acked:
        assert values.count(value) == 1, f"acked write {value!r} seen {values.count(value)} times"
    by_value = {e.kv.value: e.kv.mod_revision for e in seen}
    assert all(by_value[v] == rev for v, rev in acked.items())
    # nothing seen that was never written; unknown outcomes at most once
    assert set(values) <= set(acked) | unknown
    assert all(values.count(v) <= 1 for v in unknown)
    assert len(acked) >= WRITES - 10, f"only {len(acked)} of {WRITES} writes acknowledged"
    print(
        f"\nfailover: {len(acked)} acked, {len(unknown)} unknown, {len(seen)} events, "
        f"leader m{leader} killed at write {KILL_AT}, total {elapsed:.2f}s"
    )
