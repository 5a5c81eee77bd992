"""Circuit-breaker counts and outlier-detection error streaks shared by the agent's worker
processes, so a DestinationRule's limits bound the node's sum over all of them (as Envoy's
breakers bound the sum over its worker threads) and its consecutive-error thresholds count the
node's errors (as Envoy's per-host counters do).

One memfd, created by the control process and mapped by every worker (`--workers N`): a table of
slots, one per cluster. A slot holds the cluster key's 64-bit hash and, per worker (its
*column*), the connections, pending requests, requests and retries that worker holds now.

- A worker writes only its own column, so no two processes ever write the same word; a limit
  is checked against the sum of the columns. Check and increment are two steps: workers that
  acquire at the same instant can each pass a check made at limit - 1, so the sum can pass the
  limit by at most N - 1 until releases bring it back (Envoy's check-then-increment across
  threads has the same window).
- Claiming a slot for a new cluster takes an fcntl lock on the memfd: once per cluster per
  worker (the breaker keeps its slot). A full table leaves further clusters with per-process
  counts, logged once.
- A worker that dies took its connections and requests with it: the control zeroes its column
  once the process is gone (`clear_column`), before its successor gets the same column.

The second region holds **streaks**: per (cluster, endpoint) that has a run of errors now, and
only then, a slot with that key's hash, the time of its last error, and per column the
consecutive 5xx and gateway errors that worker saw (`SharedStreaks`). The first error claims a
slot (under the lock; one of two places the hash names, or one whose last error is over
`STALE_S` old: an endpoint that went away mid-streak); a success anywhere, or the ejection the
streak causes, frees it, so a streak is consecutive over every worker's results. A non-gateway
error zeroes every column's gateway count (Envoy resets that counter on any other result). Only
claim and free take the lock: an increment racing a free may leave one stray count in the free
slot, which the next claim zeroes. No slot (both places held by live streaks): that endpoint
counts per worker, logged once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator

from nodeagent.log import get_logger

log = get_logger("balance")

MAGIC = b"NABRK002"
HEADER = struct.Struct("<8sIII")  # magic, slots, columns, streak slots; padded to HEADER_BYTES
HEADER_BYTES = 64
KINDS = ("connections", "pending", "requests", "retries")
DEFAULT_SLOTS = 4096
DEFAULT_STREAK_SLOTS = 4096
MAX_COLUMNS = 64
# A streak slot whose last error is this old may be taken by another key.
STALE_S = 600.0


class SharedCountsError(ValueError):
    """The memfd is not a breaker table this code can use (named in the message)."""


def key_hash(key: str) -> int:
    """The slot key: a signed 64-bit hash, never 0 (0 marks a free slot)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)
    return h or 1


class SharedSlot:
    """One cluster's counters: this process's column is written, every column is read."""

    __slots__ = ("_base", "_columns", "_own", "_words")

    def __init__(self, words: memoryview, base: int, own: int, columns: int) -> None:
        self._words = words
        self._base = base  # index of the slot's first counter (after its hash word)
        self._own = own
        self._columns = columns

    def total(self, kind: int) -> int:
        """The node's count of `kind` (an index into KINDS): the sum of every column."""
        words, i = self._words, self._base + kind
        return sum(words[i + 4 * c] for c in range(self._columns))

    def add(self, kind: int, delta: int) -> None:
        """Change this process's own count of `kind`."""
        self._words[self._base + 4 * self._own + kind] += delta


class SharedCounts:
    """The mapped table. `create` in the control; `attach(fd, column)` in worker `column`."""

    def __init__(self, fd: int, column: int, *, owns_fd: bool) -> None:
        self.fd = fd
        self._owns_fd = owns_fd
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise SharedCountsError(f"breaker table fd {fd}: {size} bytes, not a table")
        self._map = mmap.mmap(fd, size)
        magic, slots, columns, streak_slots = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            self._map.close()
            raise SharedCountsError(f"breaker table fd {fd}: bad magic {magic!r}")
        if size != _size(slots, columns, streak_slots) or min(slots, streak_slots) < 1:
            self._map.close()
            raise SharedCountsError(
                f"breaker table fd {fd}: {size} bytes, {slots} + {streak_slots} slots x "
                f"{columns} columns need {_size(slots, columns, streak_slots)}"
            )
        if not 0 <= column < columns:
            self._map.close()
            raise SharedCountsError(f"breaker table: column {column} outside 0..{columns - 1}")
        self.slots = slots
        self.columns = columns
        self.column = column
        self._row = 1 + 4 * columns  # words per slot: the hash, then 4 counters per column
        self._views = [memoryview(self._map)]
        self._views.append(self._views[0][HEADER_BYTES:])
        self._words = self._views[1].cast("q")
        self._full_logged = False
        self.streaks = SharedStreaks(self, slots * self._row, streak_slots)

    @classmethod
    def create(
        cls, columns: int, *, slots: int = DEFAULT_SLOTS, streak_slots: int = DEFAULT_STREAK_SLOTS
    ) -> SharedCounts:
        """A zeroed table for `columns` workers; its fd is inheritable by `pass_fds`."""
        if not 1 <= columns <= MAX_COLUMNS:
            raise SharedCountsError(f"breaker table: {columns} columns, 1..{MAX_COLUMNS}")
        if min(slots, streak_slots) < 1:
            raise SharedCountsError(f"breaker table: {slots} slots, {streak_slots} streak slots")
        fd = os.memfd_create("nodeagent-breakers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _size(slots, columns, streak_slots))
            os.pwrite(fd, HEADER.pack(MAGIC, slots, columns, streak_slots), 0)
            return cls(fd, 0, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, column: int) -> SharedCounts:
        return cls(fd, column, owns_fd=True)

    def slot(self, key: str) -> SharedSlot | None:
        """The slot of cluster `key`, claimed if no process has it yet; None when full."""
        h = key_hash(key)
        words, row = self._words, self._row
        with self.locked():
            start = (h & 0x7FFF_FFFF_FFFF_FFFF) % self.slots
            for probe in range(self.slots):
                at = ((start + probe) % self.slots) * row
                if words[at] == h:
                    return SharedSlot(words, at + 1, self.column, self.columns)
                if words[at] == 0:
                    words[at] = h
                    return SharedSlot(words, at + 1, self.column, self.columns)
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "balance.shared_table_full",
                slots=self.slots,
                cluster=key,
                effect="this and later new clusters count per worker process",
            )
        return None

    def clear_column(self, column: int) -> None:
        """Zero `column` in every slot (its worker is gone)."""
        if not 0 <= column < self.columns:
            raise SharedCountsError(f"breaker table: column {column} outside 0..{self.columns - 1}")
        words, row = self._words, self._row
        for at in range(0, self.slots * row, row):
            if words[at] != 0:
                base = at + 1 + 4 * column
                for k in range(len(KINDS)):
                    words[base + k] = 0
        self.streaks.clear_column(column)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The table's lock (fcntl, across processes): claiming and freeing slots."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._words.release()
        for view in reversed(self._views):
            view.release()
        self._map.close()
        if self._owns_fd:
            os.close(self.fd)


class SharedStreaks:
    """The streak region of a `SharedCounts` table (see the module's docstring). Keys are
    `key_hash` values of a cluster-and-endpoint string; `error` and `reset` are the detector's
    two calls, made by every worker for every result on a cluster with outlier detection."""

    def __init__(self, table: SharedCounts, start: int, slots: int) -> None:
        self._table = table
        self._words = table._words
        self._start = start  # the region's first word
        self.slots = slots
        self._columns = table.columns
        self._own = table.column
        self._row = 2 + 2 * table.columns  # hash, last error (ms), then (5xx, gateway) per column
        self._full_logged = False

    def _places(self, h: int) -> tuple[int, int]:
        u = h & 0xFFFF_FFFF_FFFF_FFFF
        a, b = u % self.slots, (u >> 32) % self.slots
        return self._start + a * self._row, self._start + b * self._row

    def _find(self, h: int) -> int | None:
        for at in self._places(h):
            if self._words[at] == h:
                return at
        return None

    def error(self, h: int, *, gateway: bool, now: float) -> tuple[int, int] | None:
        """Count one error of this worker on key `h`: the node's (consecutive 5xx, consecutive
        gateway errors) after it, or None when no slot is free (count per worker)."""
        at = self._find(h)
        if at is None:
            at = self._claim(h, now)
            if at is None:
                return None
        words, cols = self._words, self._columns
        words[at + 1] = int(now * 1000)
        own = at + 2 + 2 * self._own
        words[own] += 1
        if gateway:
            words[own + 1] += 1
        else:
            for c in range(cols):
                words[at + 3 + 2 * c] = 0
        c5 = sum(words[at + 2 + 2 * c] for c in range(cols))
        cg = sum(words[at + 3 + 2 * c] for c in range(cols))
        return c5, cg

    def reset(self, h: int) -> None:
        """A success (or an ejection) ends key `h`'s streak for every worker: free its slot."""
        if self._find(h) is None:
            return
        with self._table.locked():
            at = self._find(h)
            if at is not None:
                self._zero(at)

    def _claim(self, h: int, now: float) -> int | None:
        words = self._words
        stale = int((now - STALE_S) * 1000)
        with self._table.locked():
            at = self._find(h)
            if at is not None:
                return at  # another worker claimed it meanwhile
            for at in self._places(h):
                if words[at] == 0 or words[at + 1] < stale:
                    self._zero(at)
                    words[at] = h
                    return at
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "balance.shared_streaks_full",
                slots=self.slots,
                effect="an endpoint whose two slots hold other streaks counts errors per worker",
            )
        return None

    def _zero(self, at: int) -> None:
        for i in range(at, at + self._row):
            self._words[i] = 0

    def clear_column(self, column: int) -> None:
        """Zero `column`'s counts in every streak (its worker is gone)."""
        words = self._words
        for at in range(self._start, self._start + self.slots * self._row, self._row):
            if words[at] != 0:
                words[at + 2 + 2 * column] = 0
                words[at + 3 + 2 * column] = 0

    def live(self) -> int:
        """Slots holding a streak now."""
        words = self._words
        return sum(
            1
            for at in range(self._start, self._start + self.slots * self._row, self._row)
            if words[at] != 0
        )


class ClusterStreaks:
    """One cluster's keys in the streak region: `scope` (the cluster's breaker key) and an
    endpoint's "address:port", hashed once per endpoint."""

    __slots__ = ("_hashes", "_scope", "_streaks")
    MAX_CACHED = 4096

    def __init__(self, streaks: SharedStreaks, scope: str) -> None:
        self._streaks = streaks
        self._scope = scope
        self._hashes: dict[str, int] = {}

    def _hash(self, endpoint: str) -> int:
        h = self._hashes.get(endpoint)
        if h is None:
            if len(self._hashes) >= self.MAX_CACHED:
                self._hashes.clear()  # endpoints churned: hashing again is cheap
            h = self._hashes[endpoint] = key_hash(f"{self._scope}|{endpoint}")
        return h

    def error(self, endpoint: str, *, gateway: bool, now: float) -> tuple[int, int] | None:
        return self._streaks.error(self._hash(endpoint), gateway=gateway, now=now)

    def reset(self, endpoint: str) -> None:
        self._streaks.reset(self._hash(endpoint))


def _size(slots: int, columns: int, streak_slots: int) -> int:
    return HEADER_BYTES + (slots * (1 + 4 * columns) + streak_slots * (2 + 2 * columns)) * 8
