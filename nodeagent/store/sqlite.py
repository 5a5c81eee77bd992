"""The embedded store backend (`sqlite:///path.db`), the default: one file, several processes.

Processes on one machine share the file safely: WAL mode (readers never block the writer),
a busy timeout, and `BEGIN IMMEDIATE` for every write, so each write transaction reads the
current revision and bumps it under SQLite's one write lock. Tables:

    meta(name, value)                       schema version, current revision, compacted revision
    kv(key, value, create_rev, mod_rev, version, lease)
    log(rev, sub, key, type, value, create_rev, version, lease)   one row per event, for watches
    leases(id, ttl, expires_at)            expires_at is wall-clock time (shared across processes)

The log keeps the last `retention` revisions (10,000 by default); older ones are compacted and a
watch from before them raises CompactedError. Expired leases are reaped by whichever process
next writes, reads or polls: their keys are deleted as delete events of one revision.

Watches wake at once on this process's own commits. Other processes' commits wake them through
inotify on the write-ahead log (`wal_watch.py`: every commit writes it), watched by one idle
watch on behalf of all of a store's watches; `PRAGMA data_version` (a read of SQLite's
shared-memory WAL index: no transaction, no I/O, no worker thread) is the check behind it, every
`SAFETY_INTERVAL` with inotify and every `POLL_INTERVAL` without. Only when something changed (or
a lease falls due, so that a dead process's keys are still reaped) do watches read the log (one
indexed range read). An idle agent's watches sleep in the kernel; a write by another process is
seen within milliseconds (~25 ms without inotify). Every other SQLite call runs in a worker
thread (`trio.to_thread`), one connection per store, one call at a time.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio

from nodeagent.log import get_logger
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
    StoreUnavailable,
    TxnResult,
)
from nodeagent.store.url import StoreURL
from nodeagent.store.wal_watch import WalWatch

log = get_logger("store.sqlite")

SCHEMA_VERSION = 1
DEFAULT_RETENTION = 10_000
POLL_INTERVAL = 0.025  # without inotify: how often an idle store looks for others' commits
SAFETY_INTERVAL = 1.0  # with inotify: a look anyway, in case the WAL file was replaced
BUSY_TIMEOUT = 10.0
WATCH_WINDOW = 1000  # revisions read per poll, bounding one batch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER NOT NULL,
    sub INTEGER NOT NULL,
    key TEXT NOT NULL,
    type INTEGER NOT NULL,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL,
    PRIMARY KEY (rev, sub)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at);
INSERT OR IGNORE INTO meta VALUES ('schema', 1), ('revision', 1), ('compacted', 1);
"""

_PUT, _DELETE = 0, 1

T = TypeVar("T")


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: no bound).

    SQLite's BINARY collation compares UTF-8 bytes, whose order is code point order, the same
    order Python's `str` comparison uses.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be stored; skip past them
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


def _key_range(prefix: str, prefix_mode: bool) -> tuple[str, list[str]]:
    if not prefix_mode:
        return "key = ?", [prefix]
    end = prefix_end(prefix)
    if end is None:
        return "1", []
    return "key >= ? AND key < ?", [prefix, end]


class _Db:
    """The synchronous half: every method runs in a worker thread, one at a time."""

    def __init__(self, path: str, label: str, retention: int) -> None:
        self.label = label
        self.retention = retention
        self.next_expiry = float("inf")  # the earliest lease expiry as of the last read
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        # create it 0600 ourselves: SQLite gives its -wal and -shm files the same mode
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self.conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        # Several processes creating a fresh file at once: switching it to WAL (and WAL recovery)
        # can answer SQLITE_BUSY without calling the busy handler, so retry here, bounded.
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                # every statement is idempotent, so processes opening the file at once do not race
                self.conn.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    self.conn.close()
                    raise
                time.sleep(0.01)
        schema = self.meta("schema")
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{label}: schema version {schema}, this agent knows {SCHEMA_VERSION}")

    # -- helpers, called inside a transaction -----------------------------------------------

    def meta(self, name: str) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    def _next_expiry(self) -> float:
        row = self.conn.execute("SELECT min(expires_at) FROM leases").fetchone()
        return float(row[0]) if row[0] is not None else float("inf")

    def _read(self, fn: Callable[[], T]) -> T:
        # another process may have granted a lease and died: look (one index probe), not cache
        self.next_expiry = self._next_expiry()
        if time.time() >= self.next_expiry:
            self._write(lambda rev: (None, 0))  # reaps as a side effect
            self.next_expiry = self._next_expiry()
        self.conn.execute("BEGIN")
        try:
            return fn()
        finally:
            self.conn.execute("COMMIT")

    def _write(self, fn: Callable[[int], tuple[T, int]]) -> T:
        """Run `fn(next_revision) -> (result, events)` in one write transaction, after reaping."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            self._reap(time.time())
            rev = self.meta("revision") + 1
            result, events = fn(rev)
            if events:
                self._bump(rev)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return result

    def _bump(self, rev: int) -> None:
        c = self.conn
        c.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
        compacted = self.meta("compacted")
        if rev - compacted > self.retention + self.retention // 8:
            self._compact(rev - self.retention)

    def _compact(self, revision: int) -> None:
        self.conn.execute("DELETE FROM log WHERE rev < ?", (revision,))
        self.conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (revision,))

    def _reap(self, now: float) -> None:
        c = self.conn
        dead = [r[0] for r in c.execute("SELECT id FROM leases WHERE expires_at <= ?", (now,))]
        if not dead:
            return
        rev = self.meta("revision") + 1
        events = 0
        for lid in dead:
            c.execute("DELETE FROM leases WHERE id = ?", (lid,))
            keys = [
                r[0] for r in c.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lid,))
            ]
            for key in keys:
                events = self._delete_one(rev, events, key)
        if events:
            self._bump(rev)
        log.info("lease.expired", store=self.label, leases=len(dead), keys=events, revision=rev)

    def _delete_one(self, rev: int, sub: int, key: str) -> int:
        self.conn.execute("DELETE FROM kv WHERE key = ?", (key,))
        self.conn.execute(
            "INSERT INTO log VALUES (?, ?, ?, ?, x'', 0, 0, 0)", (rev, sub, key, _DELETE)
        )
        return sub + 1

    def _apply(self, rev: int, branch: Sequence[Op]) -> int:
        c = self.conn
        sub = 0
        for op in branch:
            if isinstance(op, Put):
                if (
                    op.lease
                    and not c.execute("SELECT 1 FROM leases WHERE id = ?", (op.lease,)).fetchone()
                ):
                    raise LeaseNotFound(
                        f"{self.label}: lease {op.lease:#x} not found (expired or revoked)"
                    )
                old = c.execute(
                    "SELECT create_rev, version FROM kv WHERE key = ?", (op.key,)
                ).fetchone()
                create, version = (old[0], old[1] + 1) if old else (rev, 1)
                c.execute(
                    "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                    (op.key, op.value, create, rev, version, op.lease),
                )
                c.execute(
                    "INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (rev, sub, op.key, _PUT, op.value, create, version, op.lease),
                )
                sub += 1
            else:
                where, args = _key_range(op.key, op.prefix)
                keys = [
                    r[0] for r in c.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", args)
                ]
                for key in keys:
                    sub = self._delete_one(rev, sub, key)
        return sub

    @staticmethod
    def _kv(row: Sequence[Any]) -> KeyValue:
        return KeyValue(
            key=row[0],
            value=bytes(row[1]),
            create_revision=row[2],
            mod_revision=row[3],
            version=row[4],
            lease=row[5],
        )

    # -- operations ------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        def read() -> KeyValue | None:
            row = self.conn.execute("SELECT * FROM kv WHERE key = ?", (key,)).fetchone()
            return self._kv(row) if row else None

        return self._read(read)

    def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        where, args = _key_range(prefix, True)

        def read() -> tuple[list[KeyValue], int]:
            rows = self.conn.execute(f"SELECT * FROM kv WHERE {where} ORDER BY key", args)
            kvs = [self._kv(r) for r in rows]
            return kvs, self.meta("revision")

        return self._read(read)

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> tuple[TxnResult, int]:
        def write(rev: int) -> tuple[tuple[TxnResult, int], int]:
            ok = True
            for cmp in compares:
                row = self.conn.execute(
                    "SELECT mod_rev FROM kv WHERE key = ?", (cmp.key,)
                ).fetchone()
                if (row[0] if row else 0) != cmp.mod_revision:
                    ok = False
                    break
            events = self._apply(rev, success if ok else failure)
            now = rev if events else rev - 1
            return (TxnResult(succeeded=ok, revision=now), events), events

        return self._write(write)

    def grant(self, ttl: float) -> int:
        def write(rev: int) -> tuple[int, int]:
            while True:
                lid = secrets.randbits(62) or 1
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO leases VALUES (?, ?, ?)", (lid, ttl, time.time() + ttl)
                )
                if cur.rowcount == 1:
                    return lid, 0

        return self._write(write)

    def keep_alive(self, lease: int) -> float:
        def write(rev: int) -> tuple[float, int]:
            row = self.conn.execute("SELECT ttl FROM leases WHERE id = ?", (lease,)).fetchone()
            if row is None:
                raise LeaseNotFound(
                    f"{self.label}: lease {lease:#x} not found (expired or revoked)"
                )
            ttl = float(row[0])
            self.conn.execute(
                "UPDATE leases SET expires_at = ? WHERE id = ?", (time.time() + ttl, lease)
            )
            return ttl, 0

        return self._write(write)

    def revoke(self, lease: int) -> int:
        def write(rev: int) -> tuple[int, int]:
            c = self.conn
            c.execute("DELETE FROM leases WHERE id = ?", (lease,))
            sub = 0
            keys = [
                r[0] for r in c.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))
            ]
            for key in keys:
                sub = self._delete_one(rev, sub, key)
            return sub, sub

        return self._write(write)

    def compact(self, revision: int) -> None:
        def write(rev: int) -> tuple[None, int]:
            current = rev - 1
            if revision > current:
                raise StoreError(f"{self.label}: compact {revision} is after revision {current}")
            if revision > self.meta("compacted"):
                self._compact(revision)
            return None, 0

        self._write(write)

    def start(self, start_revision: int) -> int:
        """Where a watch from `start_revision` begins (0: after now); checks compaction."""

        def read() -> int:
            start = start_revision if start_revision > 0 else self.meta("revision") + 1
            compacted = self.meta("compacted")
            if start < compacted:
                raise CompactedError(start, compacted)
            return start

        return self._read(read)

    def poll(self, prefix: str, cursor: int) -> tuple[list[Event], int]:
        """Events under `prefix` from `cursor` on (a bounded window); returns the next cursor."""
        where, args = _key_range(prefix, True)

        def read() -> tuple[list[Event], int]:
            compacted = self.meta("compacted")
            if cursor < compacted:
                raise CompactedError(cursor, compacted)
            current = self.meta("revision")
            if current < cursor:
                return [], cursor
            upto = min(current, cursor + WATCH_WINDOW - 1)
            rows = self.conn.execute(
                "SELECT rev, key, type, value, create_rev, version, lease FROM log "
                f"WHERE rev >= ? AND rev <= ? AND {where} ORDER BY rev, sub",
                [cursor, upto, *args],
            )
            events = [
                Event("put", KeyValue(r[1], bytes(r[3]), r[4], r[0], r[5], r[6]))
                if r[2] == _PUT
                else Event("delete", checks.deleted(r[1], r[0]))
                for r in rows
            ]
            return events, upto + 1

        return self._read(read)

    def close(self) -> None:
        self.conn.close()


class _Look:
    """Whether another connection committed since the last look: `PRAGMA data_version` on a
    connection used only for this, from the trio thread (it reads the shared-memory WAL index:
    microseconds, no transaction, no disk I/O)."""

    def __init__(self, path: str) -> None:
        # busy timeout 0: if the index is locked for a moment, say "changed" rather than block
        self._conn = sqlite3.connect(path, timeout=0, isolation_level=None)
        self._version = -1

    def changed(self) -> bool:
        try:
            version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return True
        changed, self._version = version != self._version, version
        return changed

    def close(self) -> None:
        self._conn.close()


class SqliteStore(Store):
    """A `Store` in one SQLite file, shared with other processes of this machine."""

    def __init__(self, url: str, db: _Db, look: _Look, wal: WalWatch | None) -> None:
        self.url = url
        self._db = db
        self._look = look
        self._wal = wal
        self._looking = False  # one idle watch looks for other processes' commits
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self._closed = False

    @classmethod
    async def open(cls, url: StoreURL) -> SqliteStore:
        retention = int(url.number("retention", DEFAULT_RETENTION, minimum=1))
        try:
            db = await trio.to_thread.run_sync(_Db, url.path, url.redacted, retention)
            look = _Look(url.path)
            # the -wal file exists once the schema step above has run in WAL mode
            wal = WalWatch.open(url.path + "-wal")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{url.redacted}: open {url.path}: {exc}") from None
        except OSError as exc:
            raise StoreUnavailable(f"{url.redacted}: open {url.path}: {exc.strerror}") from None
        log.debug("store.opened", store=url.redacted)
        return cls(url.redacted, db, look, wal)

    async def _call(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreError(f"{self.url}: {op} on a closed store")
        async with self._lock:
            try:
                return await trio.to_thread.run_sync(fn, *args)
            except sqlite3.OperationalError as exc:
                # "database is locked" after the busy timeout, disk full, I/O error
                raise StoreUnavailable(f"{self.url}: {op}: {exc}") from None
            except sqlite3.Error as exc:
                raise StoreError(f"{self.url}: {op}: {exc}") from None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def get(self, key: str) -> KeyValue | None:
        return await self._call("get", self._db.get, key)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self._call("range", self._db.range, prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        checks.check_key(self.url, key)
        result = await self.txn((), [Put(key, value, lease)])
        return result.revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        if not prefix:
            checks.check_key(self.url, key)
        _, events = await self._call("delete", self._db.txn, (), [Delete(key, prefix)], ())
        if events:
            self._notify()
        return events

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        checks.check_ops(self.url, success)
        checks.check_ops(self.url, failure)
        result, events = await self._call("txn", self._db.txn, compares, success, failure)
        if events:
            self._notify()
        return result

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`; a later watch from before it raises CompactedError."""
        await self._call("compact", self._db.compact, revision)

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise StoreError(f"{self.url}: lease ttl must be positive, got {ttl}")
        return await self._call("grant_lease", self._db.grant, ttl)

    async def keep_alive(self, lease: int) -> float:
        return await self._call("keep_alive", self._db.keep_alive, lease)

    async def revoke_lease(self, lease: int) -> None:
        if await self._call("revoke_lease", self._db.revoke, lease):
            self._notify()

    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[Event]]]:
        return self._watch(prefix, start_revision)

    @asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[AsyncIterator[Sequence[Event]]]:
        start = await self._call("watch", self._db.start, start_revision)
        events = self._events(prefix, start)
        try:
            yield events
        finally:
            await events.aclose()

    async def _events(self, prefix: str, cursor: int) -> AsyncGenerator[Sequence[Event], None]:
        while True:
            changed = self._changed
            events, cursor = await self._call("watch", self._db.poll, prefix, cursor)
            if events:
                yield events
                continue
            await self._wait_for_commit(changed)
            if self._closed:
                raise StoreError(f"{self.url}: watch on {prefix!r} ended: store closed")

    async def _wait_for_commit(self, changed: trio.Event) -> None:
        """Until this process commits (`changed`), another one does, or a lease falls due.

        One idle watch at a time looks (wakes every POLL_INTERVAL); the others only wait for
        `changed`, which the looker sets when it sees a change, and also when it stops looking
        for any reason, so that one of them takes over."""
        if self._looking:
            await changed.wait()
            return
        self._looking = True
        try:
            while not self._closed:
                interval = POLL_INTERVAL if self._wal is None else SAFETY_INTERVAL
                due = self._db.next_expiry - time.time()
                with trio.move_on_after(max(0.0, min(interval, due))):
                    if self._wal is None:
                        await changed.wait()
                    else:
                        await self._wal.wait_written()  # this process's commits write it too
                    return
                if time.time() >= self._db.next_expiry or self._look.changed():
                    return
        except trio.ClosedResourceError:
            return  # aclose() closed the inotify descriptor under us
        finally:
            self._looking = False
            self._notify()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notify()
        if self._wal is not None:
            self._wal.close()
        async with self._lock:
            await trio.to_thread.run_sync(self._db.close)
        self._look.close()
