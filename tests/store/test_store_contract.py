"""The one contract every store backend passes: memory, sqlite (a tmp file) and a real etcd."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

from nodeagent.store import (
    CompactedError,
    Compare,
    Delete,
    Event,
    LeaseNotFound,
    Put,
    Store,
    StoreError,
    codec,
)
from nodeagent.store.lease import hold_lease

WAIT = 10.0  # bound on anything a test waits for


async def collect(store: Store, prefix: str, start: int, count: int) -> list[Event]:
    """The first `count` events under `prefix` from `start`, bounded in time."""
    out: list[Event] = []
    with trio.fail_after(WAIT):
        async with store.watch(prefix, start_revision=start) as events:
            async for batch in events:
                out.extend(batch)
                if len(out) >= count:
                    return out
    raise AssertionError("watch ended early")


def summary(events: Sequence[Event]) -> list[tuple[str, str, bytes, int]]:
    return [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events]


async def test_put_get_versions(store: Store, ns: str) -> None:
    assert await store.get(ns + "a") is None
    r1 = await store.put(ns + "a", b"one")
    r2 = await store.put(ns + "a", b"two")
    assert r2 > r1 > 0
    kv = await store.get(ns + "a")
    assert kv is not None
    assert (kv.key, kv.value) == (ns + "a", b"two")
    assert (kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (r1, r2, 2, 0)


async def test_range_is_sorted_and_prefix_exact(store: Store, ns: str) -> None:
    for key in ("b", "a", "c/x", "a0"):
        await store.put(ns + "dir/" + key, key.encode())
    last = await store.put(ns + "dir2/other", b"")
    await store.put(ns + "di", b"")
    kvs, rev = await store.range(ns + "dir/")
    assert [kv.key for kv in kvs] == [ns + "dir/" + k for k in ("a", "a0", "b", "c/x")]
    assert [kv.value for kv in kvs] == [b"a", b"a0", b"b", b"c/x"]
    assert rev >= last
    assert (await store.range(ns + "nothing/"))[0] == []


async def test_delete_key_and_prefix(store: Store, ns: str) -> None:
    for key in ("p/1", "p/2", "p/3/x", "q"):
        await store.put(ns + key, b"v")
    assert await store.delete(ns + "q") == 1
    assert await store.delete(ns + "q") == 0
    assert await store.delete(ns + "p/", prefix=True) == 3
    assert (await store.range(ns))[0] == []


async def test_delete_of_nothing_does_not_bump_revision(store: Store, ns: str) -> None:
    rev = await store.put(ns + "k", b"")
    assert await store.delete(ns + "absent") == 0
    assert await store.delete(ns + "absent/", prefix=True) == 0
    _, now = await store.range(ns)
    assert now == rev or now > rev  # etcd is shared with other tests: only never below
    kv = await store.get(ns + "k")
    assert kv is not None
    assert kv.mod_revision == rev


async def test_txn_compare_and_swap(store: Store, ns: str) -> None:
    key = ns + "cas"
    # mod_revision 0 means "absent": create-if-absent
    created = await store.txn([Compare(key, 0)], [Put(key, b"v1")])
    assert created.succeeded
    again = await store.txn([Compare(key, 0)], [Put(key, b"clobber")], [Put(ns + "lost", b"x")])
    assert not again.succeeded
    kv = await store.get(key)
    assert kv is not None
    assert kv.value == b"v1"
    assert kv.mod_revision == created.revision
    assert await store.get(ns + "lost") is not None  # the failure branch ran
    swapped = await store.txn([Compare(key, kv.mod_revision)], [Put(key, b"v2")])
    assert swapped.succeeded
    stale = await store.txn([Compare(key, kv.mod_revision)], [Put(key, b"v3")])
    assert not stale.succeeded
    final = await store.get(key)
    assert final is not None
    assert final.value == b"v2"


async def test_txn_is_atomic_one_revision(store: Store, ns: str) -> None:
    await store.put(ns + "old/1", b"")
    await store.put(ns + "old/2", b"")
    res = await store.txn(
        [Compare(ns + "missing", 0)],
        [Put(ns + "new/a", b"a"), Put(ns + "new/b", b"b"), Delete(ns + "old/", prefix=True)],
    )
    assert res.succeeded
    kvs, _ = await store.range(ns + "new/")
    assert [kv.mod_revision for kv in kvs] == [res.revision, res.revision]
    assert (await store.range(ns + "old/"))[0] == []
    events = await collect(store, ns, res.revision, 4)
    assert {e.kv.mod_revision for e in events} == {res.revision}
    assert sorted((e.type, e.kv.key) for e in events) == [
        ("delete", ns + "old/1"),
        ("delete", ns + "old/2"),
        ("put", ns + "new/a"),
        ("put", ns + "new/b"),
    ]


async def test_txn_failed_compare_applies_nothing(store: Store, ns: str) -> None:
    await store.put(ns + "x", b"1")
    res = await store.txn(
        [Compare(ns + "x", 0), Compare(ns + "y", 0)], [Put(ns + "y", b""), Delete(ns + "x")]
    )
    assert not res.succeeded
    assert await store.get(ns + "y") is None
    assert await store.get(ns + "x") is not None


async def test_txn_refuses_overlapping_writes(store: Store, ns: str) -> None:
    with pytest.raises(StoreError, match="twice"):
        await store.txn([], [Put(ns + "d", b"1"), Put(ns + "d", b"2")])
    with pytest.raises(StoreError, match="both puts and deletes"):
        await store.txn([], [Put(ns + "d/e", b"1"), Delete(ns + "d/", prefix=True)])
    assert (await store.range(ns))[0] == []


async def test_watch_replays_in_order_and_resumes(store: Store, ns: str) -> None:
    r1 = await store.put(ns + "w/a", b"1")
    r2 = await store.put(ns + "w/b", b"2")
    await store.put(ns + "elsewhere", b"no")
    await store.delete(ns + "w/a")
    r4 = await store.put(ns + "w/b", b"3")
    events = await collect(store, ns + "w/", r1, 4)
    assert [(e.type, e.kv.key, e.kv.value) for e in events] == [
        ("put", ns + "w/a", b"1"),
        ("put", ns + "w/b", b"2"),
        ("delete", ns + "w/a", b""),
        ("put", ns + "w/b", b"3"),
    ]
    revs = [e.kv.mod_revision for e in events]
    assert revs == sorted(revs)
    assert revs[0] == r1
    assert revs[-1] == r4
    assert events[3].kv.version == 2
    assert events[3].kv.create_revision == r2
    # resume from the middle: exactly the tail, no repeats
    tail = await collect(store, ns + "w/", revs[2], 2)
    assert summary(tail) == summary(events[2:])


async def test_watch_sees_live_writes(store: Store, ns: str) -> None:
    _, rev = await store.range(ns)
    got: list[Event] = []

    async def writer() -> None:
        for i in range(20):
            await store.put(ns + f"live/{i:02d}", str(i).encode())

    with trio.fail_after(WAIT):
        async with (
            store.watch(ns + "live/", start_revision=rev + 1) as events,
            trio.open_nursery() as n,
        ):
            n.start_soon(writer)
            async for batch in events:
                got.extend(batch)
                if len(got) >= 20:
                    break
    assert [e.kv.value for e in got] == [str(i).encode() for i in range(20)]


async def test_watch_from_compacted_revision(store: Store, ns: str) -> None:
    r1 = await store.put(ns + "c", b"1")
    await store.put(ns + "c", b"2")
    r3 = await store.put(ns + "c", b"3")
    await store.compact(r3)
    with pytest.raises(CompactedError) as info:
        await collect(store, ns, r1, 1)
    assert info.value.requested == r1
    # the compaction point itself can still be watched
    events = await collect(store, ns, r3, 1)
    assert events[0].kv.value == b"3"


async def test_lease_expiry_deletes_keys(store: Store, ns: str, short_ttl: float) -> None:
    lease = await store.grant_lease(short_ttl)
    assert lease != 0
    await store.put(ns + "node/1", b"", lease=lease)
    rev = await store.put(ns + "node/2", b"", lease=lease)
    kv = await store.get(ns + "node/1")
    assert kv is not None
    assert kv.lease == lease
    started = trio.current_time()
    events = await collect(store, ns + "node/", rev + 1, 2)
    assert {(e.type, e.kv.key) for e in events} == {
        ("delete", ns + "node/1"),
        ("delete", ns + "node/2"),
    }
    assert trio.current_time() - started >= short_ttl * 0.5
    assert (await store.range(ns + "node/"))[0] == []
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease)
    with pytest.raises(LeaseNotFound):
        await store.put(ns + "node/3", b"", lease=lease)
    assert await store.get(ns + "node/3") is None


async def test_revoke_deletes_keys(store: Store, ns: str) -> None:
    lease = await store.grant_lease(30)
    await store.put(ns + "r/1", b"", lease=lease)
    other = await store.put(ns + "r/2", b"")
    await store.revoke_lease(lease)
    kvs, _ = await store.range(ns + "r/")
    assert [kv.key for kv in kvs] == [ns + "r/2"]
    assert kvs[0].mod_revision == other
    await store.revoke_lease(lease)  # unknown lease: not an error
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease)


async def test_hold_lease_keeps_keys_alive(store: Store, ns: str, short_ttl: float) -> None:
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(hold_lease, store, short_ttl)
        await store.put(ns + "held", b"", lease=lease)
        await trio.sleep(short_ttl * 1.6)  # real time: the server's clock decides expiry
        assert await store.get(ns + "held") is not None
        nursery.cancel_scope.cancel()
    assert await store.get(ns + "held") is None  # revoked on the way out


async def test_undecodable_value_names_its_key(store: Store, ns: str) -> None:
    await store.put(ns + "good", codec.encode({"v": 1}))
    await store.put(ns + "bad", b"\xc1")  # 0xc1 is never valid msgpack
    good = await store.get(ns + "good")
    bad = await store.get(ns + "bad")
    assert good is not None
    assert bad is not None
    assert codec.decode(good) == {"v": 1}
    with pytest.raises(codec.DecodeError, match=r"bad'") as info:
        codec.decode(bad)
    assert info.value.key == ns + "bad"


async def test_binary_and_unicode_round_trip(store: Store, ns: str) -> None:
    key = ns + "ünï/ключ"
    value = bytes(range(256))
    await store.put(key, value)
    kvs, _ = await store.range(ns + "ünï/")
    assert [(kv.key, kv.value) for kv in kvs] == [(key, value)]


async def test_closed_store_refuses(store_url: str) -> None:
    from nodeagent.store import open_store

    s = await open_store(store_url)
    await s.aclose()
    with pytest.raises(StoreError, match="closed"):
        await s.get("/x")
