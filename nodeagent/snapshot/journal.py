"""CacheJournal: keeps the disk cache (`cache.py`) in step with the builder, which holds no raw
documents, by journaling the changes instead of rewriting the documents from memory.

SnapshotSync hands it what changed: a re-list's whole listing (`rebase`, with the keys of held
documents the listing lacks) and each applied batch (`record`). Its writer task takes what is
pending (`take`) and writes it in a worker thread (`write`): a listing replaces the file
atomically, a batch is appended and fsynced. When the appended part outgrows the last whole
write (by `compact_ratio`, at least `compact_min` bytes), the file is folded and rewritten whole:
read once per that much churn, in a thread, and never held in between.

The file as the journal knows it: `_size`, its length as last written or read, or None when it
must not be appended to (none yet, a version 1 or torn file loaded, an append that failed
uncleanly); then the next write is a whole one, from a pending listing or from folding the file.
A file that cannot be folded either (gone, not a cache) takes no more batches until the next
re-list provides a listing (`abandon`, `orphaned`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.snapshot import cache
from nodeagent.snapshot.errors import CacheError
from nodeagent.store.base import Event, KeyValue

Batch = tuple[Sequence[Event], int]  # events and the revision they bring the documents to


@dataclass(slots=True)
class Pending:
    """What is to be written: optionally a listing (the file is rewritten from it), then batches."""

    listing: list[KeyValue] | None = None
    revision: int = 0  # the listing's
    keep: frozenset[str] = frozenset()  # keys whose documents come from the file as it was
    prior: list[Batch] = field(default_factory=list)  # batches before the listing (for `keep`)
    batches: list[Batch] = field(default_factory=list)

    def events(self) -> int:
        return sum(len(events) for events, _ in (*self.prior, *self.batches))


class CacheJournal:
    def __init__(
        self,
        path: Path,
        *,
        compact_ratio: float = 1.0,
        compact_min: int = 1 << 20,
        max_pending: int = 100_000,
    ) -> None:
        self.path = path
        self._compact_ratio = compact_ratio
        self._compact_min = compact_min
        self._max_pending = max_pending
        self._pending = Pending()
        self._size: int | None = None  # appendable length, or None: rewrite before appending
        self._whole = 0  # length of the last whole write (or load)
        self._foldable = False  # the file holds a consistent state of the documents
        self.orphaned = False  # batches are dropped until the next listing

    # -- the sync's side (trio thread, no I/O) ------------------------------------------------

    def rebase(self, kvs: list[KeyValue], revision: int, keep: Iterable[str] = ()) -> None:
        """A re-list: the documents are now `kvs` plus those held before with keys in `keep`."""
        keep = frozenset(keep)
        prior = self._pending.prior + self._pending.batches if keep else []
        self._pending = Pending(kvs, revision, keep, prior)
        self.orphaned = False

    def record(self, events: Sequence[Event], revision: int) -> None:
        """An applied batch (only the events the cache keeps)."""
        if events and not self.orphaned:
            self._pending.batches.append((events, revision))

    def pending(self) -> bool:
        p = self._pending
        return p.listing is not None or bool(p.batches)

    def take(self) -> Pending | None:
        """What is pending, handed to `write` (in a thread); recording goes on meanwhile."""
        if not self.pending():
            return None
        work, self._pending = self._pending, Pending()
        return work

    def restore(self, work: Pending) -> bool:
        """Put back what a failed `write` did not write (it is retried with the next write);
        False when that would pass `max_pending` events: everything is dropped instead, and the
        journal waits for the next re-list."""
        newer = self._pending
        if newer.listing is not None and not newer.keep:
            return True  # the newer listing supersedes it
        if newer.listing is not None:
            newer.prior[:0] = [*work.prior, *work.batches]
            merged = newer
        else:
            work.batches.extend(newer.batches)
            merged = work
        if merged.events() > self._max_pending:
            self._pending = Pending()
            self.orphaned = True
            return False
        self._pending = merged
        return True

    def abandon(self) -> None:
        """After a write that failed for good (CacheError): drop the batches until the next
        re-list, whose listing is written whole (one already pending stays)."""
        if self._pending.listing is None:
            self._pending = Pending()
            self.orphaned = True

    # -- the writer's side (a worker thread, blocking) ----------------------------------------

    def load(self) -> cache.Cached | None:
        """The cache file's documents, or None when there is none; CacheError if unusable."""
        self._size, self._foldable = None, False
        data = cache.read(self.path)
        if data is None:
            return None
        found = cache.decode(data, str(self.path))
        self._foldable = True
        self._whole = found.end
        if found.version == cache.VERSION and found.dropped is None:
            self._size = found.end
        return found

    def write(self, work: Pending) -> str:
        """Write `work`; what was done ("rewritten", "appended", "compacted"). OSError: the
        file is as it was, `restore` the work. CacheError: there is no file to append to or to
        fold (gone, not a cache): `abandon`."""
        if work.listing is not None:
            docs = work.listing
            if work.keep:
                docs = docs + self._kept(work.keep, work.prior)
            self._rewrite(cache.encode(docs, work.revision), work.batches)
            return "rewritten"
        if self._size is None:
            if not self._foldable:
                raise CacheError(f"{self.path}: no cache to append to")
            self._compact(work.batches)
            return "compacted"
        data = b"".join(cache.encode_changes(events, rev) for events, rev in work.batches)
        try:
            cache.append(self.path, data, self._size)
        except (CacheError, FileNotFoundError):
            self._size = None  # not the file last written: fold what is there, rewrite whole
            self._compact(work.batches)
            return "compacted"
        self._size += len(data)
        if self._size - self._whole > max(self._whole * self._compact_ratio, self._compact_min):
            try:
                self._compact([])
            except OSError:
                return "appended"  # the batches are on disk; compaction is tried again later
            return "compacted"
        return "appended"

    def _rewrite(self, head: bytes, batches: list[Batch]) -> None:
        data = head + b"".join(cache.encode_changes(events, rev) for events, rev in batches)
        cache.write(self.path, data)
        self._size = self._whole = len(data)
        self._foldable = True

    def _fold(self, batches: list[Batch]) -> tuple[dict[str, KeyValue], int]:
        """The file's documents with `batches` applied, and their revision."""
        try:
            data = cache.read(self.path)
            if data is None:
                raise CacheError(f"{self.path}: gone")
            found = cache.decode(data, str(self.path))
        except CacheError:
            self._size, self._foldable = None, False
            raise
        docs = {kv.key: kv for kv in found.kvs}
        revision = found.revision
        for events, rev in batches:
            for e in events:
                if e.type == "put":
                    docs[e.kv.key] = e.kv
                else:
                    docs.pop(e.kv.key, None)
            revision = max(revision, rev)
        return docs, revision

    def _kept(self, keep: frozenset[str], prior: list[Batch]) -> list[KeyValue]:
        if not self._foldable:
            return []  # nothing on disk to keep them from
        try:
            docs, _ = self._fold(prior)
        except CacheError:
            return []
        return [docs[k] for k in sorted(keep & docs.keys())]

    def _compact(self, batches: list[Batch]) -> None:
        docs, revision = self._fold(batches)
        self._rewrite(cache.encode(docs.values(), revision), [])
