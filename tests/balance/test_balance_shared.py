"""The workers' shared breaker table (`balance.shared`): a limit bounds the sum over every
process's column, across real processes mapping one memfd; a dead worker's column is cleared;
bad tables are refused by name; a full table falls back to per-process counts. Its streak
region: consecutive errors counted over every worker, ended by any worker's success."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nodeagent.balance import CircuitBreaker, ConnectionPool, ConnectionToken, Overflow, Token
from nodeagent.balance.outlier import OutlierDetector
from nodeagent.balance.policy import OutlierDetection
from nodeagent.balance.shared import (
    HEADER_BYTES,
    STALE_S,
    ClusterStreaks,
    SharedCounts,
    SharedCountsError,
)
from nodeagent.balance.state import EndpointState, Outcome
from nodeagent.snapshot.model import Endpoint

LIMITS = ConnectionPool(max_connections=2, max_pending_requests=1)
ENDPOINT = Endpoint("10.0.0.1", 80)


@pytest.fixture
def table() -> Iterator[SharedCounts]:
    t = SharedCounts.create(3, slots=16)
    yield t
    t.close()


def column(table: SharedCounts, index: int) -> SharedCounts:
    return SharedCounts.attach(os.dup(table.fd), index)


def test_a_limit_bounds_the_sum_over_every_column(table: SharedCounts) -> None:
    w0, w1 = column(table, 0), column(table, 1)
    a = CircuitBreaker("c", LIMITS, shared=w0.slot("c"))
    b = CircuitBreaker("c", LIMITS, shared=w1.slot("c"))
    held = a.try_acquire_connection()
    assert isinstance(held, ConnectionToken)
    assert isinstance(b.try_acquire_connection(), ConnectionToken)
    refused = b.try_acquire_connection()
    assert isinstance(refused, Overflow)
    assert refused.kind == "connections"
    assert isinstance(a.try_acquire_connection(), Overflow)
    assert a.statistics()["node"]["connections"] == 2
    assert a.statistics()["active"]["connections"] == 1  # its own share
    held.release()
    held.release()  # twice is harmless: one slot back, not two
    assert isinstance(b.try_acquire_connection(), ConnectionToken)
    assert isinstance(a.try_acquire_connection(), Overflow)
    # Other kinds and other clusters are counted apart.
    assert isinstance(a.try_acquire_pending(), Token)
    assert isinstance(b.try_acquire_pending(), Overflow)
    other = CircuitBreaker("d", LIMITS, shared=w1.slot("d"))
    assert isinstance(other.try_acquire_connection(), ConnectionToken)
    w0.close()
    w1.close()


def test_a_dead_workers_column_is_cleared(table: SharedCounts) -> None:
    w1 = column(table, 1)
    b = CircuitBreaker("c", LIMITS, shared=w1.slot("c"))
    b.try_acquire_connection()
    b.try_acquire_connection()
    w0 = column(table, 0)
    a = CircuitBreaker("c", LIMITS, shared=w0.slot("c"))
    assert isinstance(a.try_acquire_connection(), Overflow)
    table.clear_column(1)
    assert isinstance(a.try_acquire_connection(), ConnectionToken)
    with pytest.raises(SharedCountsError, match=r"column 3 outside 0\.\.2"):
        table.clear_column(3)
    w0.close()
    w1.close()


# A second process: attach to column 1, hold two connections of cluster "c", report, wait.
CHILD = """
import sys
from nodeagent.balance import CircuitBreaker, ConnectionPool
from nodeagent.balance.shared import SharedCounts
t = SharedCounts.attach(int(sys.argv[1]), 1)
cb = CircuitBreaker("c", ConnectionPool(max_connections=2), shared=t.slot("c"))
held = [cb.try_acquire_connection(), cb.try_acquire_connection(), cb.try_acquire_connection()]
print(" ".join(type(h).__name__ for h in held), flush=True)
sys.stdin.readline()
held[0].release()
print("released", cb.statistics()["node"]["connections"], flush=True)
sys.stdin.readline()
"""


def test_processes_share_one_table(table: SharedCounts) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(table.fd)],
        pass_fds=(table.fd,),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline().split() == ["ConnectionToken", "ConnectionToken", "Overflow"]
        here = CircuitBreaker("c", ConnectionPool(max_connections=2), shared=table.slot("c"))
        assert here.in_use("connections") == 2
        assert isinstance(here.try_acquire_connection(), Overflow)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["released", "1"]
        got = here.try_acquire_connection()
        assert isinstance(got, ConnectionToken)
        assert isinstance(here.try_acquire_connection(), Overflow)
    finally:
        child.kill()
        child.communicate()
    table.clear_column(1)  # what the supervisor does once the worker is buried
    assert here.in_use("connections") == 1


def test_a_full_table_falls_back_to_per_process_counts() -> None:
    t = SharedCounts.create(2, slots=2)
    try:
        assert t.slot("a") is not None
        assert t.slot("b") is not None
        assert t.slot("a") is not None  # claimed already: found again
        assert t.slot("c") is None
        cb = CircuitBreaker("c", ConnectionPool(max_connections=1), shared=t.slot("c"))
        assert isinstance(cb.try_acquire_connection(), ConnectionToken)
        assert isinstance(cb.try_acquire_connection(), Overflow)
        assert "node" not in cb.statistics()
    finally:
        t.close()


def test_bad_tables_are_refused_by_name() -> None:
    with pytest.raises(SharedCountsError, match=r"65 columns, 1\.\.64"):
        SharedCounts.create(65)
    fd = os.memfd_create("t")
    try:
        with pytest.raises(SharedCountsError, match="0 bytes, not a table"):
            SharedCounts.attach(os.dup(fd), 0)
        os.ftruncate(fd, HEADER_BYTES + 8)
        with pytest.raises(SharedCountsError, match="bad magic"):
            SharedCounts.attach(os.dup(fd), 0)
    finally:
        os.close(fd)
    t = SharedCounts.create(2, slots=4)
    try:
        with pytest.raises(SharedCountsError, match=r"column 2 outside 0\.\.1"):
            SharedCounts.attach(os.dup(t.fd), 2)
        os.ftruncate(t.fd, HEADER_BYTES + 8)
        with pytest.raises(SharedCountsError, match=r"4 \+ 4096 slots x 2 columns need"):
            SharedCounts.attach(os.dup(t.fd), 1)
    finally:
        t.close()


# -- error streaks (outlier detection's consecutive errors over every worker) -----------------


def test_a_streak_counts_every_workers_errors_until_any_success(table: SharedCounts) -> None:
    w0, w1 = column(table, 0), column(table, 1)
    try:
        s0, s1 = ClusterStreaks(w0.streaks, "c"), ClusterStreaks(w1.streaks, "c")
        assert s0.error("10.0.0.1:80", gateway=True, now=1.0) == (1, 1)
        assert s1.error("10.0.0.1:80", gateway=True, now=1.1) == (2, 2)
        assert s0.error("10.0.0.1:80", gateway=True, now=1.2) == (3, 3)
        # Another endpoint, and the same endpoint of another cluster, are streaks of their own.
        assert s1.error("10.0.0.2:80", gateway=False, now=1.2) == (1, 0)
        assert ClusterStreaks(w1.streaks, "d").error("10.0.0.1:80", gateway=False, now=1) == (1, 0)
        # A non-gateway error ends every worker's gateway run, not the 5xx one.
        assert s1.error("10.0.0.1:80", gateway=False, now=1.3) == (4, 0)
        # One worker's success ends the streak for all: its slot is free again.
        live = table.streaks.live()
        s1.reset("10.0.0.1:80")
        assert table.streaks.live() == live - 1
        assert s0.error("10.0.0.1:80", gateway=False, now=1.4) == (1, 0)
        s0.reset("10.0.0.9:80")  # no streak: nothing to free, no error
    finally:
        w0.close()
        w1.close()


def test_a_dead_workers_errors_leave_the_streaks(table: SharedCounts) -> None:
    w0, w1 = column(table, 0), column(table, 1)
    try:
        s0, s1 = ClusterStreaks(w0.streaks, "c"), ClusterStreaks(w1.streaks, "c")
        s1.error("10.0.0.1:80", gateway=False, now=1.0)
        s1.error("10.0.0.1:80", gateway=False, now=1.0)
        table.clear_column(1)
        assert s0.error("10.0.0.1:80", gateway=False, now=1.1) == (1, 0)
    finally:
        w0.close()
        w1.close()


def test_a_full_streak_region_counts_per_worker_and_stale_slots_are_taken() -> None:
    t = SharedCounts.create(2, slots=4, streak_slots=1)  # one slot: both places are the same
    try:
        s = ClusterStreaks(t.streaks, "c")
        assert s.error("a:1", gateway=False, now=1000.0) == (1, 0)
        assert s.error("b:1", gateway=False, now=1001.0) is None  # held by a live streak
        # A streak whose last error is STALE_S old (its endpoint went away) gives way.
        assert s.error("b:1", gateway=False, now=1000.0 + STALE_S + 1) == (1, 0)
        assert s.error("a:1", gateway=False, now=1000.0 + STALE_S + 2) is None
    finally:
        t.close()


def test_two_detectors_sharing_streaks_eject_at_the_nodes_threshold(table: SharedCounts) -> None:
    w0, w1 = column(table, 0), column(table, 1)
    try:
        policy = OutlierDetection(consecutive_5xx=3, base_ejection_s=30, max_ejection_percent=100)
        detectors = [
            OutlierDetector("c", policy, 0.0, streaks=ClusterStreaks(w.streaks, "c"))
            for w in (w0, w1)
        ]
        states = [EndpointState(ENDPOINT, None, 0.01, 0.0) for _ in detectors]

        def result(i: int, outcome: Outcome) -> str | None:
            event = detectors[i].record(states[i], outcome, 1.0, 3)
            return event.kind if event else None

        # Alternating workers: 2 errors, a success on the other worker, then 3 in a row.
        assert [result(0, Outcome.ERROR_5XX), result(1, Outcome.ERROR_5XX)] == [None, None]
        assert result(0, Outcome.SUCCESS) is None
        assert [result(1, Outcome.ERROR_5XX), result(0, Outcome.ERROR_5XX)] == [None, None]
        assert result(1, Outcome.ERROR_5XX) == "ejected"  # each worker alone saw 1 or 2
        assert states[1].ejected
        assert not states[0].ejected  # the other adopts it through the control (registry)
        assert table.streaks.live() == 0  # the ejection ended the streak
    finally:
        w0.close()
        w1.close()
