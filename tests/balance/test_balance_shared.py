"""The workers' shared breaker table (`balance.shared`): a limit bounds the sum over every
process's column, across real processes mapping one memfd; a dead worker's column is cleared;
bad tables are refused by name; a full table falls back to per-process counts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nodeagent.balance import CircuitBreaker, ConnectionPool, ConnectionToken, Overflow, Token
from nodeagent.balance.shared import HEADER_BYTES, SharedCounts, SharedCountsError

LIMITS = ConnectionPool(max_connections=2, max_pending_requests=1)


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
        with pytest.raises(SharedCountsError, match="4 slots x 2 columns need"):
            SharedCounts.attach(os.dup(t.fd), 1)
    finally:
        t.close()
