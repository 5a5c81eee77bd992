"""LeaseGrace, the pure rule for holding a lapsed node's workload deletions (no store, no clock:
times are plain numbers)."""

from __future__ import annotations

from nodeagent.snapshot.lease_grace import LeaseGrace
from nodeagent.store import keys
from nodeagent.store.base import Event, KeyValue

W1, W2 = keys.workload("n1", "u1"), keys.workload("n1", "u2")
OTHER = keys.workload("n2", "u3")


def put(key: str, rev: int) -> Event:
    return Event("put", KeyValue(key, b"x", rev, rev, 1))


def delete(key: str, rev: int) -> Event:
    return Event("delete", KeyValue(key, b"", 0, rev, 0))


def live(grace: LeaseGrace, *nodes: str) -> None:
    grace.filter([put(keys.node(n), 1) for n in nodes], now=0)


def test_workloads_deleted_with_their_node_record_are_held_in_any_order() -> None:
    grace = LeaseGrace(10)
    live(grace, "n1", "n2")
    batch = [delete(W1, 5), delete(keys.node("n1"), 5), delete(W2, 5), delete(OTHER, 5)]
    out = grace.filter(batch, now=100)
    assert [e.kv.key for e in out] == [keys.node("n1"), OTHER]  # n2 lives: its delete goes
    assert dict(grace.held) == {W1: 110, W2: 110}
    assert grace.next_deadline() == 110


def test_a_put_ends_the_hold_and_the_deadline_releases_the_rest() -> None:
    grace = LeaseGrace(10)
    live(grace, "n1")
    grace.filter([delete(keys.node("n1"), 5), delete(W1, 5), delete(W2, 5)], now=100)
    assert grace.filter([put(W1, 6), put(keys.node("n1"), 7)], now=101) != []
    assert dict(grace.held) == {W2: 110}
    assert grace.expired(now=109.9) == []
    assert grace.expired(now=110) == [W2]
    assert grace.next_deadline() is None


def test_deletions_shortly_after_the_record_went_are_held_later_ones_are_not() -> None:
    grace = LeaseGrace(10)
    live(grace, "n1")
    grace.filter([delete(keys.node("n1"), 5)], now=100)
    assert grace.filter([delete(W1, 6)], now=105) == []
    assert grace.expired(now=120) == [W1]
    assert grace.filter([delete(W2, 7)], now=120) == [delete(W2, 7)]


def test_workloads_deleted_before_the_record_in_one_batch_go_at_once() -> None:
    grace = LeaseGrace(10)
    live(grace, "n1")
    batch = [delete(W1, 5), delete(W2, 6), delete(keys.node("n1"), 7)]  # uninstall's order
    assert grace.filter(batch, now=100) == batch
    assert grace.held == {}


def test_explicit_deletes_and_nodes_without_a_record_go_at_once() -> None:
    grace = LeaseGrace(10)
    live(grace, "n1")
    assert grace.filter([delete(W1, 5)], now=100) == [delete(W1, 5)]  # n1's record lives
    assert grace.filter([delete(OTHER, 6)], now=100) == [delete(OTHER, 6)]  # n2 never had one
    assert grace.held == {}


def test_relist_keeps_held_and_newly_lapsed_workloads() -> None:
    grace = LeaseGrace(10)
    live(grace, "n1", "n2")
    listed = [put(keys.node("n2"), 9).kv, put(OTHER, 3).kv]  # n1's lease lapsed meanwhile
    kvs, keep = grace.relist(listed, [W1, W2, OTHER], now=100)
    assert kvs == listed
    assert keep == {W1, W2}
    assert dict(grace.held) == {W1: 110, W2: 110}


def test_zero_grace_holds_nothing() -> None:
    grace = LeaseGrace(0)
    batch = [put(keys.node("n1"), 1), delete(keys.node("n1"), 2), delete(W1, 2)]
    assert grace.filter(batch, now=0) == batch
    assert grace.relist([], [W1], now=0) == ([], set())
