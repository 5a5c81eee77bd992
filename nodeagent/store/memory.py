"""The in-process store backend (`memory://`), for unit tests and single-process tools.

It keeps etcd's semantics exactly where callers can see them: one global revision (1 when
empty), create/mod revisions and versions per key, a history of events that watches replay from
any kept revision, compaction (explicit via `compact`, and automatic beyond `retention`
revisions), transactions that apply in one revision or not at all, and leases that expire by
trio's clock (so tests drive them with `autojump_clock`/`MockClock`). Expired leases are reaped
by the next operation or by any watcher, which sleeps no longer than the earliest lease deadline.

`memory://name` stores of one process share their state; plain `memory://` is always fresh.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import trio

from nodeagent.store import checks
from nodeagent.store.base import (
    CompactedError,
    Compare,
    Delete,
    Event,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    Store,
    StoreError,
    TxnResult,
)

DEFAULT_RETENTION = 10_000


@dataclass(slots=True)
class _Lease:
    ttl: float
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _Watcher:
    """One watcher's wake-up signal; the events themselves are read from the shared history."""

    wake: trio.Event


class _State:
    """The data of one memory store; several `MemoryStore` handles may share it (by name)."""

    def __init__(self, retention: int) -> None:
        self.revision = 1
        self.compacted = 1  # the oldest revision a watch may still start at
        self.kv: dict[str, KeyValue] = {}
        self.history: list[Event] = []  # ordered by kv.mod_revision
        self.leases: dict[int, _Lease] = {}
        self.lease_ids = itertools.count(0x1000)
        self.watchers: set[_Watcher] = set()
        self.retention = retention

    # -- writes; each `_commit` batch is one revision ------------------------------------------

    def commit(self, events: list[Event]) -> None:
        if not events:
            return
        self.history.extend(events)
        if self.revision - self.compacted > self.retention + self.retention // 8:
            self.compact(self.revision - self.retention)
        for w in self.watchers:
            w.wake.set()

    def compact(self, revision: int) -> None:
        if revision <= self.compacted:
            return
        revision = min(revision, self.revision)
        cut = bisect.bisect_left(self.history, revision, key=lambda e: e.kv.mod_revision)
        del self.history[:cut]
        self.compacted = revision

    def put(self, rev: int, key: str, value: bytes, lease: int) -> Event:
        old = self.kv.get(key)
        if old is not None and old.lease and old.lease != lease:
            held = self.leases.get(old.lease)
            if held is not None:
                held.keys.discard(key)
        if lease:
            self.leases[lease].keys.add(key)
        kv = KeyValue(
            key=key,
            value=value,
            create_revision=old.create_revision if old else rev,
            mod_revision=rev,
            version=old.version + 1 if old else 1,
            lease=lease,
        )
        self.kv[key] = kv
        return Event("put", kv)

    def delete(self, rev: int, key: str) -> Event | None:
        old = self.kv.pop(key, None)
        if old is None:
            return None
        if old.lease:
            held = self.leases.get(old.lease)
            if held is not None:
                held.keys.discard(key)
        return Event("delete", checks.deleted(key, rev))

    def matching(self, prefix: str) -> list[str]:
        return sorted(k for k in self.kv if k.startswith(prefix))

    def apply(self, op_list: Sequence[Op]) -> list[Event]:
        """Apply a checked branch at the next revision (not yet committed)."""
        rev = self.revision + 1
        events: list[Event] = []
        for op in op_list:
            if isinstance(op, Put):
                events.append(self.put(rev, op.key, op.value, op.lease))
            else:
                keys = self.matching(op.key) if op.prefix else [op.key]
                for key in keys:
                    ev = self.delete(rev, key)
                    if ev is not None:
                        events.append(ev)
        if events:
            self.revision = rev
        return events

    def reap(self, now: float) -> None:
        """Expire every lease past its deadline: its keys are deleted in one revision."""
        dead = [lid for lid, lease in self.leases.items() if lease.deadline <= now]
        if not dead:
            return
        keys: list[str] = []
        for lid in dead:
            keys.extend(sorted(self.leases.pop(lid).keys))
        self.commit(self.apply([Delete(k) for k in keys]))

    def next_deadline(self) -> float:
        return min((lease.deadline for lease in self.leases.values()), default=math.inf)


_NAMED: dict[str, _State] = {}


class MemoryStore(Store):
    """A `Store` held in this process's memory."""

    def __init__(
        self, url: str = "memory://", *, name: str = "", retention: int = DEFAULT_RETENTION
    ) -> None:
        self.url = url
        if name:
            state = _NAMED.get(name)
            if state is None:
                state = _NAMED[name] = _State(retention)
            self._state = state
        else:
            self._state = _State(retention)
        self._closed = False
        self._watchers: set[_Watcher] = set()

    def _begin(self, op: str) -> _State:
        if self._closed:
            raise StoreError(f"{self.url}: {op} on a closed store")
        self._state.reap(trio.current_time())
        return self._state

    @property
    def revision(self) -> int:
        return self._state.revision

    async def get(self, key: str) -> KeyValue | None:
        await trio.lowlevel.checkpoint()
        return self._begin("get").kv.get(key)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        await trio.lowlevel.checkpoint()
        s = self._begin("range")
        return [s.kv[k] for k in s.matching(prefix)], s.revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        await trio.lowlevel.checkpoint()
        s = self._begin("put")
        checks.check_key(self.url, key)
        checks.check_value(self.url, key, value)
        self._check_lease(s, lease)
        s.commit(s.apply([Put(key, value, lease)]))
        return s.revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        await trio.lowlevel.checkpoint()
        s = self._begin("delete")
        if not prefix:
            checks.check_key(self.url, key)
        events = s.apply([Delete(key, prefix)])
        s.commit(events)
        return len(events)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        await trio.lowlevel.checkpoint()
        s = self._begin("txn")
        checks.check_ops(self.url, success)
        checks.check_ops(self.url, failure)
        ok = all(
            (s.kv[c.key].mod_revision if c.key in s.kv else 0) == c.mod_revision for c in compares
        )
        branch = success if ok else failure
        # validate every lease before touching anything: all or nothing
        for op in branch:
            if isinstance(op, Put):
                self._check_lease(s, op.lease)
        s.commit(s.apply(branch))
        return TxnResult(succeeded=ok, revision=s.revision)

    def _check_lease(self, s: _State, lease: int) -> None:
        if lease and lease not in s.leases:
            raise LeaseNotFound(f"{self.url}: lease {lease:#x} not found (expired or revoked)")

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`; a later watch from before it raises CompactedError."""
        await trio.lowlevel.checkpoint()
        s = self._begin("compact")
        if revision > s.revision:
            raise StoreError(f"{self.url}: compact {revision} is after the current revision")
        s.compact(revision)

    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[Event]]]:
        return self._watch(prefix, start_revision)

    @asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[AsyncIterator[Sequence[Event]]]:
        s = self._begin("watch")
        start = start_revision if start_revision > 0 else s.revision + 1
        if start < s.compacted:
            raise CompactedError(start, s.compacted)
        w = _Watcher(trio.Event())
        s.watchers.add(w)
        self._watchers.add(w)
        events = self._events(s, w, prefix, start)
        try:
            yield events
        finally:
            await events.aclose()
            s.watchers.discard(w)
            self._watchers.discard(w)

    async def _events(
        self, s: _State, w: _Watcher, prefix: str, cursor: int
    ) -> AsyncGenerator[Sequence[Event], None]:
        while True:
            if self._closed:
                raise StoreError(f"{self.url}: watch on {prefix!r} ended: store closed")
            s.reap(trio.current_time())
            if cursor < s.compacted:
                # a watcher that fell behind the retention window cannot be served gaplessly
                raise CompactedError(cursor, s.compacted)
            at = bisect.bisect_left(s.history, cursor, key=lambda e: e.kv.mod_revision)
            batch = [e for e in s.history[at:] if e.kv.key.startswith(prefix)]
            cursor = max(cursor, s.revision + 1)
            if batch:
                yield batch
                continue
            w.wake = trio.Event()
            with trio.move_on_at(s.next_deadline()):
                await w.wake.wait()

    async def grant_lease(self, ttl: float) -> int:
        await trio.lowlevel.checkpoint()
        s = self._begin("grant_lease")
        if not ttl > 0:
            raise StoreError(f"{self.url}: lease ttl must be positive, got {ttl}")
        lid = next(s.lease_ids)
        s.leases[lid] = _Lease(ttl=ttl, deadline=trio.current_time() + ttl)
        return lid

    async def keep_alive(self, lease: int) -> float:
        await trio.lowlevel.checkpoint()
        s = self._begin("keep_alive")
        held = s.leases.get(lease)
        if held is None:
            raise LeaseNotFound(f"{self.url}: lease {lease:#x} not found (expired or revoked)")
        held.deadline = trio.current_time() + held.ttl
        return held.ttl

    async def revoke_lease(self, lease: int) -> None:
        await trio.lowlevel.checkpoint()
        s = self._begin("revoke_lease")
        held = s.leases.pop(lease, None)
        if held is not None:
            s.commit(s.apply([Delete(k) for k in sorted(held.keys)]))

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
        for w in self._watchers:
            w.wake.set()
