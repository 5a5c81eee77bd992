"""Circuit breaking: exact overflow counts, token release, limits changed under live tokens."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.balance import CircuitBreaker, ConnectionPool, ConnectionToken, Overflow, Token


def _burst(cb: CircuitBreaker, n: int) -> tuple[list[ConnectionToken], list[Token], list[Overflow]]:
    """n concurrent HTTP/1 requests with no connection free: each opens a connection if it may,
    else queues as pending if it may, else overflows (Envoy's order)."""
    conns: list[ConnectionToken] = []
    pending: list[Token] = []
    overflow: list[Overflow] = []
    for _ in range(n):
        c = cb.try_acquire_connection()
        if isinstance(c, ConnectionToken):
            conns.append(c)
            continue
        p = cb.try_acquire_pending()
        if isinstance(p, Token):
            pending.append(p)
        else:
            overflow.append(p)
    return conns, pending, overflow


def test_burst_beyond_limits_overflows_exactly() -> None:
    cb = CircuitBreaker("c", ConnectionPool(max_connections=2, max_pending_requests=3))
    conns, pending, overflow = _burst(cb, 10)
    assert (len(conns), len(pending), len(overflow)) == (2, 3, 5)
    assert all(o.status == 503 and o.flag == "UO" and o.kind == "pending" for o in overflow)
    assert "pending limit 3 reached (503 UO)" in str(overflow[0])
    stats = cb.statistics()
    assert stats["overflow"] == {"connections": 8, "pending": 5, "requests": 0, "retries": 0}
    assert stats["active"]["connections"] == 2
    assert stats["active"]["pending"] == 3
    # Releasing (twice is harmless) frees exactly one slot each.
    conns[0].release()
    conns[0].release()
    assert isinstance(cb.try_acquire_connection(), ConnectionToken)
    assert isinstance(cb.try_acquire_connection(), Overflow)
    for p in pending:
        with p:
            pass
    assert cb.statistics()["active"]["pending"] == 0


def test_requests_per_connection_and_retries() -> None:
    cb = CircuitBreaker("c", ConnectionPool(max_requests_per_connection=3, max_retries=1))
    conn = cb.try_acquire_connection()
    assert isinstance(conn, ConnectionToken)
    assert [conn.note_request() for _ in range(3)] == [False, False, True]
    unlimited = CircuitBreaker("c", ConnectionPool())
    c2 = unlimited.try_acquire_connection()
    assert isinstance(c2, ConnectionToken)
    assert not any(c2.note_request() for _ in range(1000))
    r1 = cb.try_acquire_retry()
    assert isinstance(r1, Token)
    r2 = cb.try_acquire_retry()
    assert isinstance(r2, Overflow)
    assert r2.kind == "retries"
    r1.release()
    assert isinstance(cb.try_acquire_retry(), Token)


def test_limits_change_under_live_tokens() -> None:
    cb = CircuitBreaker("c", ConnectionPool(max_requests=4))
    held = [cb.try_acquire_request() for _ in range(4)]
    assert all(isinstance(t, Token) for t in held)
    cb.limits = ConnectionPool(max_requests=2)
    assert isinstance(cb.try_acquire_request(), Overflow)
    for t in held[:3]:
        assert isinstance(t, Token)
        t.release()
    assert isinstance(cb.try_acquire_request(), Token)
    assert cb.connect_timeout_s == 10.0


@given(
    limit=st.integers(0, 8),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=100),
)
@settings(max_examples=80, deadline=None)
def test_active_never_exceeds_the_limit(limit: int, ops: list[tuple[bool, int]]) -> None:
    cb = CircuitBreaker("c", ConnectionPool(max_connections=limit))
    held: list[ConnectionToken] = []
    refused = 0
    for acquire, idx in ops:
        if acquire:
            t = cb.try_acquire_connection()
            if isinstance(t, Overflow):
                refused += 1
                assert len(held) == limit
            else:
                held.append(t)
        elif held:
            held.pop(idx % len(held)).release()
        assert cb.active["connections"] == len(held) <= limit
    assert cb.overflows["connections"] == refused
