"""maxConnections across pools (source pods, worker processes) that share one cluster's
breaker: a pool holding none of the cluster's connections gets one at once, past the limit if
need be, instead of waiting in the pending queue behind slots other pools hold idle; a pool
that holds one waits for it as before. Unit test on trio's MockClock with in-memory streams."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from nodeagent.balance import CircuitBreaker, ConnectionPool
from nodeagent.http.errors import UpstreamOverflow
from nodeagent.http.pool import ConnectionPool as Pool
from nodeagent.http.pool import UpstreamConnection
from nodeagent.snapshot.model import Endpoint

EP = Endpoint("10.0.0.1", 8080)
EP2 = Endpoint("10.0.0.2", 8080)


class Idle(trio.abc.Stream):
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("not used")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("not used")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


opened: list[Endpoint] = []


async def connector(endpoint: Endpoint, port: int) -> trio.abc.Stream:
    opened.append(endpoint)
    await trio.lowlevel.checkpoint()
    return Idle()


def finish(up: UpstreamConnection) -> None:
    """One whole keep-alive exchange on the connection's codec, so it is reusable."""
    conn = up.conn
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    while conn.next_event() not in (h11.NEED_DATA, h11.PAUSED):
        pass


@pytest.fixture
def breaker() -> CircuitBreaker:
    opened.clear()
    limits = ConnectionPool(max_connections=1, max_pending_requests=5, connect_timeout_s=2.0)
    return CircuitBreaker("outbound|80||web", limits)


async def test_a_pool_with_none_of_the_clusters_connections_is_not_starved(
    autojump_clock: trio.testing.MockClock, breaker: CircuitBreaker
) -> None:
    a, b = Pool(connector, connect_timeout=2.0), Pool(connector, connect_timeout=2.0)
    first = await a.acquire(EP, 80, breaker=breaker)
    finish(first)
    await a.release(first)  # idle in pool a: it holds the cluster's one slot
    t0 = trio.current_time()
    other = await b.acquire(EP, 80, breaker=breaker)
    assert trio.current_time() == t0  # at once, not after the 2 s connect timeout
    assert breaker.in_use("connections") == 2  # past the limit, by this one pool
    assert breaker.statistics()["overflow"]["connections"] == 1

    # Pool b holds one now: a second request there waits for it, as with one pool.
    got: list[UpstreamConnection] = []

    async def second() -> None:
        got.append(await b.acquire(EP, 80, breaker=breaker))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.sleep(0.5)
        assert not got
        assert breaker.in_use("pending") == 1
        finish(other)
        await b.release(other)
    assert got == [other]  # reused, no third connection
    assert opened == [EP, EP]
    assert trio.current_time() - t0 == pytest.approx(0.5)

    # Once pool b's connection closes, its slot is given back: the count is pool a's again.
    await b.discard(got[0])
    assert breaker.in_use("connections") == 1
    assert breaker.in_use("pending") == 0


async def test_one_pool_still_keeps_to_the_limit_across_endpoints(
    autojump_clock: trio.testing.MockClock, breaker: CircuitBreaker
) -> None:
    pool = Pool(connector, connect_timeout=2.0)
    busy = await pool.acquire(EP, 80, breaker=breaker)
    with pytest.raises(UpstreamOverflow):
        await pool.acquire(EP2, 80, breaker=breaker)  # waited 2 s: the pool holds the slot
    assert breaker.in_use("connections") == 1
    await pool.discard(busy)
    assert breaker.in_use("connections") == 0
    assert breaker.in_use("pending") == 0
