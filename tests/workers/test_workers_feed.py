"""The snapshot stream: a worker that applies the mirror's messages, or starts from its full()
later, holds the control's documents at its revision; the lease grace's held keys survive a
reset; keys the snapshot does not read are not streamed."""

from __future__ import annotations

from typing import Any

from nodeagent.snapshot import SnapshotBuilder
from nodeagent.store.base import Event, KeyValue
from nodeagent.workers.feed import DocumentMirror, apply_message
from nodeagent.workers.protocol import FrameDecoder, encode

A, B, C = (f"/mesh/v1/workloads/n1/{x}" for x in "abc")


def _kv(key: str, value: bytes, rev: int) -> KeyValue:
    return KeyValue(key, value, rev, rev, 1)


def _wire(msg: dict[str, Any]) -> dict[str, Any]:
    dec = FrameDecoder()
    dec.receive_data(encode(msg))
    out = dec.next_message()
    assert out is not None
    return out.body


def test_a_follower_and_a_late_starter_hold_the_same_documents() -> None:
    mirror = DocumentMirror()
    follower = SnapshotBuilder()
    a, b = _kv(A, b"1", 1), _kv(B, b"2", 2)
    mirror.reset([a, b, _kv("/mesh/v1/nodes/n1", b"x", 2)], 2, ())
    b2, c = _kv(B, b"3", 3), _kv(C, b"4", 4)
    mirror.apply([Event("put", b2), Event("put", c)], 4)
    mirror.apply([Event("delete", KeyValue(A, b"", 0, 5, 0))], 5)
    msgs = mirror.take()
    assert [m["t"] for m in msgs] == ["snapshot_reset", "snapshot_delta", "snapshot_delta"]
    assert all(r[0] != "/mesh/v1/nodes/n1" for r in msgs[0]["kvs"])  # not a snapshot key
    for msg in msgs:
        apply_message(follower, _wire(msg))
    assert mirror.take() == []
    late = SnapshotBuilder()
    apply_message(late, _wire(mirror.full()))
    assert sorted(late.documents()) == sorted(follower.documents()) == [B, C]
    assert late.revision == follower.revision == 5
    assert late.snapshot.revision == follower.snapshot.revision


def test_a_reset_keeps_held_documents_and_supersedes_the_queue() -> None:
    mirror = DocumentMirror()
    mirror.reset([_kv(A, b"1", 1), _kv(B, b"2", 2)], 2, ())
    mirror.apply([Event("put", _kv(C, b"3", 3))], 3)
    mirror.reset([_kv(C, b"3", 3)], 9, keep=[A])  # A's deletion is held by the lease grace
    msgs = mirror.take()
    assert len(msgs) == 1
    assert msgs[0]["t"] == "snapshot_reset"
    assert sorted(r[0] for r in msgs[0]["kvs"]) == [A, C]
    assert msgs[0]["revision"] == 9
