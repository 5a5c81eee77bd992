"""The snapshot stream: a worker that applies reset + deltas holds the control's documents at
its revision; unchanged documents are not resent."""

from __future__ import annotations

from nodeagent.snapshot import SnapshotBuilder
from nodeagent.store.base import KeyValue
from nodeagent.workers.feed import SnapshotFeed, apply_message
from nodeagent.workers.protocol import FrameDecoder, encode


def _kv(key: str, value: bytes, rev: int) -> KeyValue:
    return KeyValue(key, value, rev, rev, 1)


def _through_wire(msg: dict) -> dict:  # type: ignore[type-arg]
    dec = FrameDecoder()
    dec.receive_data(encode(msg))
    out = dec.next_message()
    assert out is not None
    return out.body


def test_reset_then_deltas_reproduce_the_documents() -> None:
    feed = SnapshotFeed()
    a, b = _kv("/mesh/v1/workloads/n1/a", b"1", 1), _kv("/mesh/v1/workloads/n1/b", b"2", 2)
    first = feed.delta([a, b], 2)
    assert first is not None
    assert len(first["puts"]) == 2
    assert feed.delta([a, b], 2) is None  # nothing changed: nothing sent
    b2, c = _kv("/mesh/v1/workloads/n1/b", b"3", 3), _kv("/mesh/v1/workloads/n1/c", b"4", 4)
    second = feed.delta([b2, c], 4)
    assert second is not None
    assert [r[0] for r in second["puts"]] == ["/mesh/v1/workloads/n1/b", "/mesh/v1/workloads/n1/c"]
    assert second["deletes"] == ["/mesh/v1/workloads/n1/a"]

    late = SnapshotBuilder()  # a worker started now gets the reset only
    apply_message(late, _through_wire(feed.reset()))
    early = SnapshotBuilder()  # one that followed from the start
    apply_message(early, _through_wire(first))
    apply_message(early, _through_wire(second))
    assert late.raw() == early.raw() == [b2, c]
    assert late.revision == early.revision == 4
