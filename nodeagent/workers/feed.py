"""The snapshot's documents as a stream, so each worker builds the control's snapshot itself.

The control process reads the store watch once (its `SnapshotSync`, with the lease grace and the
disk cache). `DocumentMirror` is a `SnapshotSync` document observer (added before the sync
runs): it keeps the documents the snapshot reads (neither the builder nor the journal keeps
values) and queues one message per change, as the sync made it: `snapshot_reset` (a listing or
a cache load) or `snapshot_delta` (a batch of events, after the lease grace). The pool sends the
queue to every worker in order (`take`); a worker that (re)starts first gets `full()`: the
mirror's documents, i.e. everything streamed so far. A worker applies both to its own
`SnapshotBuilder` (`apply_message`), so it holds the same documents at the same revision.

The cost: with `--workers N > 1` the control holds one copy of the documents' bytes (what the
builder no longer keeps). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from nodeagent.snapshot import Snapshot, SnapshotBuilder
from nodeagent.snapshot.convert import parse_key
from nodeagent.store.base import Event, KeyValue


def kv_row(kv: KeyValue) -> list[Any]:
    return [kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease]


def kv_of(row: list[Any]) -> KeyValue:
    key, value, create, mod, version, lease = row
    return KeyValue(str(key), bytes(value), int(create), int(mod), int(version), int(lease))


class DocumentMirror:
    def __init__(self) -> None:
        self._docs: dict[str, KeyValue] = {}
        self._revision = 0
        self._queue: list[dict[str, Any]] = []

    @property
    def revision(self) -> int:
        return self._revision

    def __len__(self) -> int:
        return len(self._docs)

    # -- SnapshotSync's DocumentObserver -----------------------------------------------------

    def reset(self, kvs: Sequence[KeyValue], revision: int, keep: Collection[str]) -> None:
        docs = {kv.key: kv for kv in kvs if parse_key(kv.key) is not None}
        for key in keep:
            if key in self._docs and key not in docs:
                docs[key] = self._docs[key]
        self._docs = docs
        self._revision = revision
        self._queue = [self.full()]  # a reset supersedes whatever was not sent yet

    def apply(self, events: Sequence[Event], revision: int) -> None:
        rows: list[list[Any]] = []
        for e in events:
            if parse_key(e.kv.key) is None:
                continue
            if e.type == "delete":
                self._docs.pop(e.kv.key, None)
            else:
                self._docs[e.kv.key] = e.kv
            rows.append([e.type, kv_row(e.kv)])
        self._revision = max(self._revision, revision, *(e.kv.mod_revision for e in events))
        if rows or revision:
            self._queue.append(
                {"t": "snapshot_delta", "revision": max(revision, 0), "events": rows}
            )

    # -- for the pool ------------------------------------------------------------------------

    def take(self) -> list[dict[str, Any]]:
        """The messages queued since the last take, in order."""
        out, self._queue = self._queue, []
        return out

    def full(self) -> dict[str, Any]:
        return {
            "t": "snapshot_reset",
            "revision": self._revision,
            "kvs": [kv_row(kv) for kv in self._docs.values()],
        }


def apply_message(builder: SnapshotBuilder, msg: dict[str, Any]) -> Snapshot:
    """Apply a `reset` or `delta` message to a worker's builder; the new snapshot."""
    revision = int(msg["revision"])
    if msg["t"] == "snapshot_reset":
        return builder.reset([kv_of(r) for r in msg["kvs"]], revision)
    events = [Event("delete" if t == "delete" else "put", kv_of(row)) for t, row in msg["events"]]
    return builder.apply(events, revision=revision)
