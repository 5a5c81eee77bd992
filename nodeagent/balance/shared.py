"""Circuit-breaker counts shared by the agent's worker processes, so a DestinationRule's limits
bound the node's sum over all of them (as Envoy's breakers bound the sum over its worker threads).

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

MAGIC = b"NABRK001"
HEADER = struct.Struct("<8sII")  # magic, slots, columns; padded to HEADER_BYTES
HEADER_BYTES = 64
KINDS = ("connections", "pending", "requests", "retries")
DEFAULT_SLOTS = 4096
MAX_COLUMNS = 64


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
        magic, slots, columns = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            self._map.close()
            raise SharedCountsError(f"breaker table fd {fd}: bad magic {magic!r}")
        if size != _size(slots, columns):
            self._map.close()
            raise SharedCountsError(
                f"breaker table fd {fd}: {size} bytes, {slots} slots x {columns} columns "
                f"need {_size(slots, columns)}"
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

    @classmethod
    def create(cls, columns: int, *, slots: int = DEFAULT_SLOTS) -> SharedCounts:
        """A zeroed table for `columns` workers; its fd is inheritable by `pass_fds`."""
        if not 1 <= columns <= MAX_COLUMNS:
            raise SharedCountsError(f"breaker table: {columns} columns, 1..{MAX_COLUMNS}")
        if slots < 1:
            raise SharedCountsError(f"breaker table: {slots} slots")
        fd = os.memfd_create("nodeagent-breakers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _size(slots, columns))
            os.pwrite(fd, HEADER.pack(MAGIC, slots, columns), 0)
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
        with self._locked():
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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
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


def _size(slots: int, columns: int) -> int:
    return HEADER_BYTES + slots * (1 + 4 * columns) * 8
