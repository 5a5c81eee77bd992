"""SnapshotSync: keeps `current` (the Snapshot the proxy reads) in step with the store.

List the prefix, build, start watching from the listing's revision + 1, and turn each batch of
events into the next snapshot, swapped in with one assignment. Events are coalesced: after a
batch arrives, whatever else the store sends within `coalesce_delay` (up to `coalesce_max`
events) is applied with it, so a burst (a node pool's 1,000 registrations) costs one rebuild
and one swap, and no event waits longer than `coalesce_delay`. A compacted watch re-lists (the
builder applies only the difference); any other store error keeps the last snapshot and retries
with exponential backoff, resuming the watch from the last revision seen: a store outage never
stops traffic. With `cache_path`, the documents are journaled to disk (`journal.py`: each listing
written whole, each applied batch appended; debounced, and once more on the way out if a change
is not on disk yet) and loaded at start, so a restarted agent serves from the cache when the
store does not answer within `startup_timeout`. Neither the builder nor the journal keeps the raw
documents in memory.

The deletion of a workload whose node's lease lapsed (its node record went with it) is held for
`lease_grace` seconds (nodeagent.snapshot.lease_grace): a store stall longer than the lease TTL
expires every lease at once, and the agents, still running, put everything back within a second
or so; the endpoints must not vanish meanwhile.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from nodeagent.log import get_logger
from nodeagent.snapshot.builder import SnapshotBuilder
from nodeagent.snapshot.convert import parse_key
from nodeagent.snapshot.errors import CacheError
from nodeagent.snapshot.journal import CacheJournal
from nodeagent.snapshot.lease_grace import LeaseGrace, node_of_record
from nodeagent.snapshot.snapshot import Snapshot
from nodeagent.store import keys
from nodeagent.store.base import CompactedError, Event, KeyValue, Store, StoreError

log = get_logger("snapshot.sync")

Listener = Callable[[Snapshot], None]


class DocumentObserver(Protocol):
    def reset(self, kvs: Sequence[KeyValue], revision: int, keep: Collection[str]) -> None:
        """The documents are now exactly `kvs` plus the held ones whose keys are in `keep`."""

    def apply(self, events: Sequence[Event], revision: int) -> None:
        """`events` were applied (in order) at `revision`."""


_NOTHING: Any = object()  # no further batch within the coalescing window


def _cached(key: str) -> bool:
    """What the disk cache keeps: the documents the snapshot reads, and the node records."""
    return parse_key(key) is not None or node_of_record(key) is not None


class SnapshotSync:
    def __init__(
        self,
        store: Store,
        *,
        cache_path: Path | str | None = None,
        prefix: str = keys.ROOT,
        trust_domain: str = "cluster.local",
        root_namespace: str = "istio-system",
        startup_timeout: float = 5.0,
        cache_debounce: float = 1.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        coalesce_delay: float = 0.05,
        coalesce_max: int = 5000,
        lease_grace: float = 10.0,
    ) -> None:
        self._store = store
        self._journal = None if cache_path is None else CacheJournal(Path(cache_path))
        self._prefix = prefix
        self._builder = SnapshotBuilder(trust_domain=trust_domain, root_namespace=root_namespace)
        self._startup_timeout = startup_timeout
        self._cache_debounce = cache_debounce
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._coalesce_delay = coalesce_delay
        self._coalesce_max = coalesce_max
        self.current: Snapshot = self._builder.snapshot
        self._swapped = trio.Event()
        self._progress = trio.Event()
        self._listeners: list[Listener] = []
        self._observers: list[DocumentObserver] = []
        self._cache_dirty = trio.Event()
        self._grace = LeaseGrace(lease_grace)
        self._grace_changed = trio.Event()
        self._stats: dict[str, Any] = {
            "swaps": 0,
            "watch_batches": 0,  # batches the store's watch delivered (swaps count fewer)
            "relists": 0,
            "store_errors": 0,
            "cache_writes": 0,
            "serving_from_cache": False,
            "last_error": None,
        }

    # -- for other components ----------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(snapshot)` after every swap (synchronously: keep it short, never
        block). Returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def wait_revision(self, revision: int) -> Snapshot:
        """Wait until the current snapshot reflects store revision `revision` (or later)."""
        while self.current.revision < revision:
            await self._swapped.wait()
        return self.current

    async def wait_swap(self) -> Snapshot:
        """Wait for the next swap; returns the new snapshot."""
        await self._swapped.wait()
        return self.current

    async def wait_until(self, predicate: Callable[[dict[str, Any]], bool]) -> None:
        """Wait until `predicate(self.statistics())` holds; re-checked after every swap, store
        error and cache write (for tests and the admin socket's readiness)."""
        while not predicate(self.statistics()):
            await self._progress.wait()

    def _bump(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    def add_document_observer(self, observer: DocumentObserver) -> None:
        """`observer` sees every change made to the builder's documents, as made (after the
        lease grace): what `nodeagent run --workers N` streams to its worker processes. Add it
        before `run`, so it sees the first listing or cache load too."""
        self._observers.append(observer)

    def statistics(self) -> dict[str, Any]:
        return {
            **self._stats,
            "held_workloads": len(self._grace.held),
            **self.current.statistics(),
        }

    # -- the component -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self._journal is not None:
                nursery.start_soon(self._cache_writer, self._journal)
            nursery.start_soon(self._release_held)
            await self._sync(task_status)

    async def _sync(self, task_status: trio.TaskStatus[None]) -> None:
        cached = await self._load_cache()
        started = False
        need_list = True
        backoff = self._backoff_initial
        swaps_at_failure = -1

        def serve_cache(why: str) -> None:
            # The store is not answering at start: serve the cached documents meanwhile.
            nonlocal started
            log.warning("snapshot.serving_from_cache", revision=self._builder.revision, why=why)
            self._stats["serving_from_cache"] = True
            self._swap(self._builder.snapshot)
            task_status.started()
            started = True

        while True:
            try:
                if need_list:
                    # A loaded cache bounds how long the first listing may take before serving.
                    timeout = self._startup_timeout if cached and not started else math.inf
                    with trio.move_on_after(timeout):
                        await self._relist()
                        need_list = False
                    if need_list:
                        serve_cache(f"no listing within {self._startup_timeout} s")
                        continue
                    if not started:
                        task_status.started()
                        started = True
                await self._watch(self._builder.revision + 1)
                raise StoreError(f"{self._store.url}: watch of {self._prefix} ended")
            except CompactedError as exc:
                log.warning("snapshot.relist", reason=str(exc))
                need_list = True
            except StoreError as exc:
                if self._stats["swaps"] != swaps_at_failure:
                    backoff = self._backoff_initial  # progress since the last failure
                swaps_at_failure = self._stats["swaps"]
                self._stats["store_errors"] += 1
                self._stats["last_error"] = str(exc)
                self._bump()
                log.warning(
                    "snapshot.store_failed",
                    error=str(exc),
                    retry_in=round(backoff, 3),
                    revision=self._builder.revision,
                )
                if cached and not started:
                    serve_cache(str(exc))
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)

    async def _relist(self) -> None:
        t0 = time.perf_counter()
        listed, revision = await self._store.range(self._prefix)
        kvs, keep = self._grace.relist(listed, self._builder.documents(), trio.current_time())
        self._grace_changed.set()
        snap = self._builder.reset(kvs, revision, keep=keep)
        for observer in self._observers:
            observer.reset(kvs, revision, keep)
        self._stats["relists"] += 1
        self._stats["serving_from_cache"] = False
        self._swap(snap)
        if self._journal is not None:
            self._journal.rebase([kv for kv in kvs if _cached(kv.key)], revision, keep)
            self._cache_dirty.set()
        log.info(
            "snapshot.listed",
            keys=len(kvs),
            ms=round((time.perf_counter() - t0) * 1000, 1),
            **snap.statistics(),
        )

    async def _watch(self, start_revision: int) -> None:
        # A reader task moves the store's batches into a channel, so that waiting for more of a
        # burst can time out without cancelling the watch itself; a store error travels the
        # channel and is raised here, where `_sync` handles it. Bounded: a slow apply pushes
        # back on the watch rather than queueing without end.
        send, receive = trio.open_memory_channel[Sequence[Event] | StoreError | None](64)

        async def read(batches: AsyncIterator[Sequence[Event]]) -> None:
            async with send:
                try:
                    async for batch in batches:
                        await send.send(batch)
                except StoreError as exc:
                    await send.send(exc)
                    return
                await send.send(None)  # the watch ended

        async with (
            self._store.watch(self._prefix, start_revision=start_revision) as batches,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(read, batches)
            async with receive:
                failure = await self._apply_coalesced(receive)
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure  # out here, not wrapped in the nursery's exception group

    async def _apply_coalesced(
        self, receive: trio.MemoryReceiveChannel[Sequence[Event] | StoreError | None]
    ) -> StoreError | None:
        """Apply batches, each with what follows it within the window, until the watch ends
        (None) or fails (the error)."""
        while True:
            item = await receive.receive()
            events: list[Event] = []
            deadline = trio.current_time() + self._coalesce_delay
            while isinstance(item, Sequence):
                events.extend(item)
                self._stats["watch_batches"] += 1
                if len(events) >= self._coalesce_max:
                    break
                item = _NOTHING
                with trio.move_on_at(deadline):
                    item = await receive.receive()
            if events:
                self._apply(events)
            if item is None or isinstance(item, StoreError):
                return item

    def _apply(self, events: list[Event]) -> None:
        t0 = time.perf_counter()
        kept = self._grace.filter(events, trio.current_time())
        if len(kept) < len(events):
            self._grace_changed.set()
            log.warning(
                "snapshot.deletions_held",
                keys=len(events) - len(kept),
                held=len(self._grace.held),
                grace=self._grace.grace,
            )
        # The batches' own revision: a held deletion is never asked for again.
        revision = max((e.kv.mod_revision for e in events), default=0)
        snap = self._builder.apply(kept, revision=revision)
        for observer in self._observers:
            observer.apply(kept, revision)
        self._swap(snap)
        if self._journal is not None:
            self._journal.record([e for e in kept if _cached(e.kv.key)], snap.revision)
            if self._journal.pending():
                self._cache_dirty.set()
        if any(parse_key(e.kv.key) is not None for e in events):
            log.info(
                "snapshot.applied",
                revision=snap.revision,
                events=len(events),
                ms=round((time.perf_counter() - t0) * 1000, 2),
            )

    async def _release_held(self) -> None:
        """Apply each held deletion when its grace is over (unless a put ended the hold)."""
        while True:
            deadline = self._grace.next_deadline()
            self._grace_changed = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._grace_changed.wait()
                continue
            keys_ = self._grace.expired(trio.current_time())
            if not keys_:
                continue
            revision = self._builder.revision
            deletions = [Event("delete", KeyValue(k, b"", 0, revision, 0)) for k in keys_]
            snap = self._builder.apply(deletions)
            for observer in self._observers:
                observer.apply(deletions, 0)
            self._swap(snap)
            if self._journal is not None:
                self._journal.record(deletions, self._builder.revision)
                self._cache_dirty.set()
            log.warning("snapshot.held_deletions_applied", keys=len(keys_), revision=revision)

    def _swap(self, snap: Snapshot) -> None:
        self.current = snap
        self._stats["swaps"] += 1
        swapped, self._swapped = self._swapped, trio.Event()
        swapped.set()
        self._bump()
        for listener in list(self._listeners):
            try:
                listener(snap)
            except Exception as exc:  # a listener's bug must not stop the sync
                log.error("snapshot.listener_failed", listener=repr(listener), error=repr(exc))

    # -- disk cache --------------------------------------------------------------------------

    async def _load_cache(self) -> bool:
        if self._journal is None:
            return False
        path = str(self._journal.path)
        try:
            found = await trio.to_thread.run_sync(self._journal.load)
        except CacheError as exc:
            log.warning("snapshot.cache_unusable", path=path, error=str(exc))
            return False
        if found is None:
            return False
        if found.dropped is not None:
            # A torn append (a crash mid-write): the documents as of the last complete batch.
            log.warning("snapshot.cache_tail_dropped", path=path, at=found.end, why=found.dropped)
        self._builder.reset(found.kvs, found.revision)
        for observer in self._observers:
            observer.reset(found.kvs, found.revision, ())
        self._grace.load_nodes(found.kvs)
        log.info(
            "snapshot.cache_loaded",
            path=path,
            revision=found.revision,
            keys=len(found.kvs),
            format_version=found.version,
        )
        return True

    async def _cache_writer(self, journal: CacheJournal) -> None:
        try:
            while True:
                await self._cache_dirty.wait()
                await trio.sleep(self._cache_debounce)  # coalesce a burst of changes
                await self._write_cache(journal)
        finally:
            if journal.pending():
                # A change not on disk yet (the agent stops within the debounce): the next
                # start may have to serve from this cache alone.
                with trio.CancelScope(shield=True):
                    await self._write_cache(journal)

    async def _write_cache(self, journal: CacheJournal) -> None:
        self._cache_dirty = trio.Event()
        work = journal.take()
        if work is None:
            return
        try:
            done = await trio.to_thread.run_sync(journal.write, work)
        except OSError as exc:
            retried = journal.restore(work)  # written with the next change
            log.warning(
                "snapshot.cache_write_failed",
                path=str(journal.path),
                error=str(exc),
                then="retry with the next change" if retried else "rewrite at the next re-list",
            )
            return
        except CacheError as exc:
            journal.abandon()
            log.warning(
                "snapshot.cache_write_failed",
                path=str(journal.path),
                error=str(exc),
                then="rewrite at the next re-list",
            )
            return
        self._stats["cache_writes"] += 1
        self._bump()
        log.debug("snapshot.cache_written", path=str(journal.path), how=done, events=work.events())
