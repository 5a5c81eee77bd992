"""The snapshot's documents as a stream, so each worker builds the control's snapshot itself.

The control process reads the store watch once (its `SnapshotSync`, with the lease grace and the
disk cache). After each swap, `SnapshotFeed.delta` compares the documents the snapshot is built
from with what was streamed so far (by identity of the stored `KeyValue`: unchanged documents
are the same objects) and yields one message of puts and deletions; a worker that (re)starts
gets `reset`: everything streamed so far, then the deltas that follow. A worker applies both to
its own `SnapshotBuilder` (`apply_message`), so it holds the same documents at the same
revision. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nodeagent.snapshot import Snapshot, SnapshotBuilder
from nodeagent.store.base import Event, KeyValue


def kv_row(kv: KeyValue) -> list[Any]:
    return [kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease]


def kv_of(row: list[Any]) -> KeyValue:
    key, value, create, mod, version, lease = row
    return KeyValue(str(key), bytes(value), int(create), int(mod), int(version), int(lease))


class SnapshotFeed:
    def __init__(self) -> None:
        self._sent: dict[str, KeyValue] = {}
        self._revision = 0

    @property
    def revision(self) -> int:
        return self._revision

    def reset(self) -> dict[str, Any]:
        """Everything streamed so far: the first message to a (re)started worker."""
        return {
            "t": "snapshot_reset",
            "revision": self._revision,
            "kvs": [kv_row(kv) for kv in self._sent.values()],
        }

    def delta(self, documents: Iterable[KeyValue], revision: int) -> dict[str, Any] | None:
        """The change from what was streamed to `documents` (at `revision`); None if nothing."""
        now = {kv.key: kv for kv in documents}
        puts = [kv_row(kv) for key, kv in now.items() if self._sent.get(key) is not kv]
        deletes = [key for key in self._sent if key not in now]
        if not puts and not deletes and revision == self._revision:
            return None
        self._sent = now
        self._revision = revision
        return {"t": "snapshot_delta", "revision": revision, "puts": puts, "deletes": deletes}


def apply_message(builder: SnapshotBuilder, msg: dict[str, Any]) -> Snapshot:
    """Apply a `reset` or `delta` message to a worker's builder; the new snapshot."""
    revision = int(msg["revision"])
    if msg["t"] == "snapshot_reset":
        return builder.reset([kv_of(r) for r in msg["kvs"]], revision)
    events = [Event("delete", KeyValue(str(k), b"", 0, revision, 0)) for k in msg["deletes"]]
    events += [Event("put", kv_of(r)) for r in msg["puts"]]
    return builder.apply(events, revision=revision)
