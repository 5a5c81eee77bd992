"""SnapshotSync against real stores (memory://, sqlite), outages, compaction and the disk cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio
from snapshot_docs import key_of, service, workload
from structlog.testing import capture_logs

from nodeagent.snapshot import Snapshot, SnapshotSync
from nodeagent.snapshot import cache as snapshot_cache
from nodeagent.snapshot.errors import CacheError
from nodeagent.store import codec, keys, open_store
from nodeagent.store.base import (
    Event,
    KeyValue,
    Store,
    StoreUnavailable,
)
from nodeagent.store.forwarding import ForwardingStore
from nodeagent.store.memory import MemoryStore

TIMEOUT = 10


class Outage(ForwardingStore):
    """A real store behind a switch: while `down`, every call fails as an unreachable store
    would, and running watches end with StoreUnavailable."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.down = False
        self.hang = False  # instead of failing, never answer (a partitioned store)
        self._changed = trio.Event()

    def set_down(self, down: bool) -> None:
        self.down = down
        self._changed.set()
        self._changed = trio.Event()

    async def _gate(self) -> None:
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise StoreUnavailable(f"{self.url}: down (test)")

    async def get(self, key: str) -> KeyValue | None:
        await self._gate()
        return await self.inner.get(key)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        await self._gate()
        return await self.inner.range(prefix)

    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[Event]]]:
        return self._watch(prefix, start_revision)

    @asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[AsyncIterator[Sequence[Event]]]:
        await self._gate()
        async with self.inner.watch(prefix, start_revision=start_revision) as events:
            yield self._until_down(events)

    async def _until_down(
        self, events: AsyncIterator[Sequence[Event]]
    ) -> AsyncIterator[Sequence[Event]]:
        while True:
            batch: Sequence[Event] | None = None
            async with trio.open_nursery() as nursery:

                async def pull() -> None:
                    nonlocal batch
                    batch = await events.__anext__()
                    nursery.cancel_scope.cancel()

                async def watch_switch() -> None:
                    while not self.down:
                        await self._changed.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pull)
                nursery.start_soon(watch_switch)
            if batch is None:
                raise StoreUnavailable(f"{self.url}: watch broken (test)")
            yield batch


async def put_workload(store: Store, uid: str, ip: str, labels: dict[str, str]) -> int:
    doc = workload(uid, ip, labels)
    return await store.put(key_of(doc), codec.encode(doc))


async def put_service(store: Store, name: str, vip: str) -> int:
    doc = service(name, {"app": name}, cluster_ip=vip)
    return await store.put(keys.config("Service", "default", name), codec.encode(doc))


async def test_sync_follows_the_store() -> None:
    store = await open_store("memory://")
    try:
        await put_service(store, "web", "10.96.0.1")
        await put_workload(store, "w1", "10.0.0.1", {"app": "web"})
        sync = SnapshotSync(store)
        seen: list[Snapshot] = []
        sync.add_listener(seen.append)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
            snap = sync.current
            svc = snap.resolve_host("web", "default")
            assert svc is not None
            assert [e.address for e in snap.endpoints(svc, 80)] == ["10.0.0.1"]
            assert seen[-1] is snap

            rev = await put_workload(store, "w2", "10.0.0.2", {"app": "web"})
            with trio.fail_after(TIMEOUT):
                snap = await sync.wait_revision(rev)
            assert snap.revision >= rev
            assert [e.address for e in snap.endpoints(svc, 80)] == ["10.0.0.1", "10.0.0.2"]

            await store.delete(keys.workload("node-1", "w1"))
            rev = await store.put(keys.CA_BUNDLE, b"irrelevant")  # moves the revision only
            with trio.fail_after(TIMEOUT):
                snap = await sync.wait_revision(rev)
            assert [e.address for e in snap.endpoints(svc, 80)] == ["10.0.0.2"]
            assert sync.statistics()["workloads"] == 1
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_a_burst_of_events_costs_one_swap(autojump_clock: object) -> None:
    store = await open_store("memory://burst")
    try:
        await put_service(store, "web", "10.96.0.1")
        sync = SnapshotSync(store, coalesce_delay=1.0, coalesce_max=60)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
            swaps, batches = sync.statistics()["swaps"], sync.statistics()["watch_batches"]
            # 100 registrations, one store revision each, all within the coalescing window
            # (the clock only moves when every task is blocked): 60 at once, then the other 40
            revs = [
                await put_workload(store, f"w{n}", f"10.0.1.{n}", {"app": "web"})
                for n in range(100)
            ]
            with trio.fail_after(TIMEOUT):
                snap = await sync.wait_revision(revs[-1])
            stats = sync.statistics()
            assert stats["swaps"] - swaps == 2  # not one per batch the watch delivered
            assert stats["watch_batches"] - batches > 2
            svc = snap.resolve_host("web", "default")
            assert svc is not None
            assert len(snap.endpoints(svc, 80)) == 100

            # a lone event still arrives, one window later at most
            start = trio.current_time()
            rev = await put_workload(store, "late", "10.0.2.1", {"app": "web"})
            with trio.fail_after(TIMEOUT):
                await sync.wait_revision(rev)
            assert trio.current_time() - start <= 1.0
            assert sync.statistics()["swaps"] - swaps == 3
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_outage_keeps_the_snapshot_and_compaction_relists(autojump_clock: object) -> None:
    inner = MemoryStore("memory://outage")
    store = Outage(inner)
    try:
        await put_service(store, "web", "10.96.0.1")
        sync = SnapshotSync(store, backoff_initial=0.01, backoff_max=0.05)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
            before = sync.current
            store.set_down(True)
            with trio.fail_after(TIMEOUT):
                await sync.wait_until(lambda s: s["store_errors"] >= 1)
            # writes the agent cannot see, then history before them is compacted away
            await put_service(store, "api", "10.96.0.2")
            rev = await put_workload(store, "w1", "10.0.0.1", {"app": "api"})
            await inner.compact(rev)
            with trio.fail_after(TIMEOUT):
                await sync.wait_until(lambda s: s["store_errors"] >= 3)
            # the outage changed nothing the proxy reads
            assert sync.current is before
            assert sync.current.find_address("10.96.0.1", 80) is not None

            relists = sync.statistics()["relists"]
            store.set_down(False)
            with trio.fail_after(TIMEOUT):
                snap = await sync.wait_revision(rev)
            assert sync.statistics()["relists"] == relists + 1  # compacted → re-listed
            api = snap.service("default", "api")
            assert api is not None
            assert [e.address for e in snap.endpoints(api, 80)] == ["10.0.0.1"]
            # and the watch works again afterwards
            rev = await put_workload(store, "w2", "10.0.0.2", {"app": "api"})
            with trio.fail_after(TIMEOUT):
                snap = await sync.wait_revision(rev)
            assert len(snap.endpoints(api, 80)) == 2
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_disk_cache_serves_a_restart_while_the_store_is_away(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "snapshot.msgpack"
    store = Outage(MemoryStore("memory://cache"))
    try:
        await put_service(store, "web", "10.96.0.1")
        rev = await put_workload(store, "w1", "10.0.0.1", {"app": "web"})
        first = SnapshotSync(store, cache_path=path, cache_debounce=0)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(first.run)
                await first.wait_until(lambda s: s["cache_writes"] >= 1)
            nursery.cancel_scope.cancel()
        assert path.stat().st_mode & 0o777 == 0o600
        cached = snapshot_cache.decode(path.read_bytes())
        assert cached.revision == rev
        assert {kv.key for kv in cached.kvs} == {
            keys.config("Service", "default", "web"),
            keys.workload("node-1", "w1"),
        }

        store.hang = True  # the restarted agent's store never answers
        second = SnapshotSync(store, cache_path=path, startup_timeout=0.2)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(second.run)
            assert second.statistics()["serving_from_cache"] is True
            snap = second.current
            assert snap.revision == rev
            assert snap.find_address("10.96.0.1", 80) is not None
            assert snap.workload_by_ip("10.0.0.1") is not None
            nursery.cancel_scope.cancel()

        store.hang = False
        store.set_down(True)  # failing fast instead of hanging: served from cache at once
        third = SnapshotSync(store, cache_path=path, startup_timeout=60)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(third.run)
            assert third.current.workload_by_ip("10.0.0.1") is not None
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_watched_changes_reach_the_cache_journal_and_a_restart_serves_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.cache"
    store = Outage(MemoryStore("memory://journal"))
    try:
        await put_service(store, "web", "10.96.0.1")
        await put_workload(store, "w1", "10.0.0.1", {"app": "web"})
        first = SnapshotSync(store, cache_path=path, cache_debounce=0)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(first.run)
                await first.wait_until(lambda s: s["cache_writes"] >= 1)  # the listing
                listed = path.stat().st_size
                await store.delete(keys.workload("node-1", "w1"))
                rev = await put_workload(store, "w2", "10.0.0.2", {"app": "web"})
                await first.wait_until(lambda s: s["cache_writes"] >= 2)  # the batch(es)
                await first.wait_revision(rev)
            nursery.cancel_scope.cancel()
        assert path.stat().st_size > listed  # appended, not rewritten
        cached = snapshot_cache.decode(path.read_bytes())
        assert cached.revision == rev

        store.hang = True
        second = SnapshotSync(store, cache_path=path, startup_timeout=0.2)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(second.run)
            assert second.statistics()["serving_from_cache"] is True
            assert second.current.workload_by_ip("10.0.0.2") is not None
            assert second.current.workload_by_ip("10.0.0.1") is None  # deleted after listing
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_a_version_1_cache_file_is_served_and_an_unknown_one_ignored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.cache"
    doc = service("web", {"app": "web"}, cluster_ip="10.96.0.1")
    entry = [key_of(doc), codec.encode(doc), 1, 1, 1]
    path.write_bytes(
        codec.encode(
            {"format": snapshot_cache.FORMAT, "version": 1, "revision": 1, "entries": [entry]}
        )
    )
    store = Outage(MemoryStore("memory://v1"))
    store.hang = True
    try:
        sync = SnapshotSync(store, cache_path=path, startup_timeout=0.2)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
            assert sync.current.find_address("10.96.0.1", 80) is not None
            nursery.cancel_scope.cancel()

        path.write_bytes(codec.encode({"format": snapshot_cache.FORMAT, "version": 3}))
        store.hang = False
        sync = SnapshotSync(store, cache_path=path)
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(TIMEOUT):
                    await nursery.start(sync.run)  # starts from the store, without the cache
                assert sync.statistics()["serving_from_cache"] is False
                nursery.cancel_scope.cancel()
        (unusable,) = [e for e in logs if e["event"] == "snapshot.cache_unusable"]
        assert "cache version 3, expected 2" in unusable["error"]
    finally:
        await store.aclose()


def test_cache_decode_rejects_bad_files() -> None:
    good = snapshot_cache.encode([KeyValue("/mesh/v1/ca/bundle", b"x", 1, 2, 1)], 2)
    found = snapshot_cache.decode(good)
    assert (found.kvs, found.revision) == ([KeyValue("/mesh/v1/ca/bundle", b"x", 1, 2, 1)], 2)
    header = codec.encode({"format": snapshot_cache.FORMAT, "version": 2})
    for bad, why in [
        (b"\xc1", "not msgpack"),
        (codec.encode({"format": "other"}), "not a snapshot cache"),
        (codec.encode({"format": snapshot_cache.FORMAT, "version": 9}), "version 9"),
        (
            codec.encode(
                {"format": snapshot_cache.FORMAT, "version": 1, "revision": 1, "entries": [[1]]}
            ),
            "entry 0",
        ),
        (header, "no complete commit"),
        (header + codec.encode(["k", b"v", 1, 1, 1]), "no complete commit"),
    ]:
        with pytest.raises(CacheError, match=why):
            snapshot_cache.decode(bad, "f.msgpack")


async def test_sync_against_sqlite(tmp_path: Path) -> None:
    store = await open_store(f"sqlite://{tmp_path}/mesh.db")
    try:
        await put_service(store, "web", "10.96.0.1")
        sync = SnapshotSync(store)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
            assert sync.current.find_address("10.96.0.1", 80) is not None
            rev = await put_workload(store, "w1", "10.0.0.1", {"app": "web"})
            with trio.fail_after(TIMEOUT):
                snap = await sync.wait_revision(rev)
            svc = snap.service("default", "web")
            assert svc is not None
            assert [e.address for e in snap.endpoints(svc, 80)] == ["10.0.0.1"]
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


# -- a node's lease lapsing: its workloads are held for the grace, explicit deletes go at once --


async def _node_with_workload(store: Store, node: str, uid: str, ip: str, ttl: float) -> int:
    """What an agent registers: a workload and its node record under the node's lease."""
    lease = await store.grant_lease(ttl)
    doc = workload(uid, ip, {"app": "web"}, node=node)
    key = key_of(doc)
    await store.put(key, codec.encode(doc), lease=lease)
    await store.put(keys.node(node), codec.encode({"v": 1, "node": node}), lease=lease)
    return lease


def _addresses(sync: SnapshotSync) -> list[str]:
    svc = sync.current.resolve_host("web", "default")
    assert svc is not None
    return [e.address for e in sync.current.endpoints(svc, 80)]


async def test_lapsed_lease_holds_the_nodes_workloads_until_they_are_put_again(
    autojump_clock: object,
) -> None:
    store = await open_store("memory://")
    await put_service(store, "web", "10.96.0.1")
    await _node_with_workload(store, "node-1", "w1", "10.0.0.1", ttl=3)
    sync = SnapshotSync(store, lease_grace=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        assert _addresses(sync) == ["10.0.0.1"]
        await trio.sleep(5)  # nobody renews: the lease expires (the store reaps it on access)
        rev = await store.put(keys.CA_BUNDLE, b"tick")
        await sync.wait_revision(rev)
        assert await store.get(keys.workload("node-1", "w1")) is None
        assert sync.statistics()["held_workloads"] == 1
        assert _addresses(sync) == ["10.0.0.1"]  # still an endpoint
        # The agent is back: a new lease, the same records.
        await trio.sleep(4)
        await _node_with_workload(store, "node-1", "w1", "10.0.0.1", ttl=60)
        rev = await store.put(keys.CA_BUNDLE, b"tick 2")
        await sync.wait_revision(rev)
        assert sync.statistics()["held_workloads"] == 0
        await trio.sleep(30)  # past the grace: nothing is deleted later
        assert _addresses(sync) == ["10.0.0.1"]
        nursery.cancel_scope.cancel()


async def test_held_deletion_applies_when_the_grace_is_over(autojump_clock: object) -> None:
    store = await open_store("memory://")
    await put_service(store, "web", "10.96.0.1")
    await _node_with_workload(store, "node-1", "w1", "10.0.0.1", ttl=3)
    expiry = trio.current_time() + 3
    sync = SnapshotSync(store, lease_grace=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        await trio.sleep(5)
        await sync.wait_revision(await store.put(keys.CA_BUNDLE, b"tick"))
        assert _addresses(sync) == ["10.0.0.1"]
        await sync.wait_until(lambda s: s["held_workloads"] == 0)
        # the memory store reaps within a second of the expiry; the grace counts from there
        assert trio.current_time() - expiry == pytest.approx(10, abs=1)
        assert _addresses(sync) == []
        nursery.cancel_scope.cancel()


async def test_explicit_delete_of_a_live_nodes_workload_goes_at_once(
    autojump_clock: object,
) -> None:
    store = await open_store("memory://")
    await put_service(store, "web", "10.96.0.1")
    lease = await _node_with_workload(store, "node-1", "w1", "10.0.0.1", ttl=60)
    sync = SnapshotSync(store, lease_grace=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        await store.delete(keys.workload("node-1", "w1"))
        await sync.wait_revision(await store.put(keys.CA_BUNDLE, b"tick"))
        assert _addresses(sync) == []
        assert sync.statistics()["held_workloads"] == 0
        # uninstall's order: workloads, then the node record, then the lease: nothing held
        doc = workload("w2", "10.0.0.2", {"app": "web"}, node="node-1")
        key = key_of(doc)
        await store.put(key, codec.encode(doc), lease=lease)
        await store.delete(key)
        await store.delete(keys.node("node-1"))
        await store.revoke_lease(lease)
        await sync.wait_revision(await store.put(keys.CA_BUNDLE, b"tick 2"))
        assert _addresses(sync) == []
        assert sync.statistics()["held_workloads"] == 0
        nursery.cancel_scope.cancel()


async def test_relist_during_a_hold_keeps_the_held_workloads(autojump_clock: object) -> None:
    inner = MemoryStore("memory://grace-relist", retention=2)
    store = Outage(inner)
    await put_service(inner, "web", "10.96.0.1")
    await _node_with_workload(inner, "node-1", "w1", "10.0.0.1", ttl=3)
    sync = SnapshotSync(store, lease_grace=10, backoff_initial=0.1, backoff_max=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        relists = sync.statistics()["relists"]
        store.set_down(True)  # the watch breaks; meanwhile the lease lapses and history compacts
        await trio.sleep(5)
        for i in range(5):
            await inner.put(keys.CA_BUNDLE, f"{i}".encode())
        store.set_down(False)
        await sync.wait_until(lambda s: s["relists"] > relists)
        assert sync.statistics()["held_workloads"] == 1
        assert _addresses(sync) == ["10.0.0.1"]
        await sync.wait_until(lambda s: s["held_workloads"] == 0)
        assert _addresses(sync) == []
        nursery.cancel_scope.cancel()


async def test_node_records_go_into_the_disk_cache(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.cache"
    store = await open_store("memory://")
    await _node_with_workload(store, "node-1", "w1", "10.0.0.1", ttl=60)
    sync = SnapshotSync(store, cache_path=path, cache_debounce=0)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            await nursery.start(sync.run)
            await sync.wait_until(lambda s: s["cache_writes"] >= 1)
        nursery.cancel_scope.cancel()
    kvs = snapshot_cache.decode(path.read_bytes()).kvs
    assert keys.node("node-1") in {kv.key for kv in kvs}


async def test_a_change_within_the_debounce_reaches_the_disk_cache_on_the_way_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshot.cache"
    store = await open_store("memory://")
    sync = SnapshotSync(store, cache_path=path, cache_debounce=3600)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            await nursery.start(sync.run)
            await sync.wait_revision(await put_service(store, "web", "10.96.0.1"))
        assert sync.statistics()["cache_writes"] == 0  # the debounce has not passed
        nursery.cancel_scope.cancel()  # the agent stops
    kvs = snapshot_cache.decode(path.read_bytes()).kvs
    assert keys.config("Service", "default", "web") in {kv.key for kv in kvs}
