"""ConnectionPool and certificate lifetime: a pooled connection whose credentials stopped holding
(a certificate expired, rotated, was revoked) is closed instead of reused or put back.

Unit test with a fake credentials object on trio's MockClock; tests/tunnel/
test_tunnel_credentials.py checks the real TunnelCredentials over real TLS."""

from __future__ import annotations

import h11
import trio
import trio.testing

from nodeagent.http.pool import ConnectionPool
from nodeagent.snapshot.model import Endpoint


class ExpiringCredentials:
    """Holds until trio time `until`, or until `revoked` is set."""

    def __init__(self, until: float) -> None:
        self.until = until
        self.revoked = False

    def problem(self) -> str | None:
        if self.revoked:
            return "revoked"
        return "expired" if trio.current_time() >= self.until else None


class CredentialedStream(trio.abc.Stream):
    """A stream that is never written to here (the exchange is played on h11 alone)."""

    def __init__(self, credentials: ExpiringCredentials) -> None:
        self.credentials = credentials
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("not used")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("not used")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


def _finish(up: object) -> None:
    """Play one whole keep-alive exchange on the connection's h11 state, so it is reusable."""
    conn = up.conn  # type: ignore[attr-defined]
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    while conn.next_event() not in (h11.NEED_DATA, h11.PAUSED):
        pass


async def test_a_connection_past_its_certificates_is_not_reused(
    mock_clock: trio.testing.MockClock,
) -> None:
    opened: list[CredentialedStream] = []

    async def connector(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        stream = CredentialedStream(ExpiringCredentials(trio.current_time() + 60))
        opened.append(stream)
        return stream

    pool = ConnectionPool(connector)
    ep = Endpoint(address="10.0.0.1", port=8080)
    up = await pool.acquire(ep, 80)
    _finish(up)
    await pool.release(up)
    assert pool.idle_count() == 1
    mock_clock.jump(30)
    again = await pool.acquire(ep, 80)
    assert again is up  # still within both certificates: reused
    _finish(again)
    await pool.release(again)
    mock_clock.jump(31)  # past the earlier notAfter, far below the 1 h idle timeout
    fresh = await pool.acquire(ep, 80, idle_timeout=3600)
    assert fresh is not up
    assert len(opened) == 2
    assert pool.stats.retired == 1
    assert opened[0].closed  # the retired connection was closed, not left open
    await pool.aclose()


async def test_a_connection_whose_credentials_failed_is_not_put_back(
    mock_clock: trio.testing.MockClock,
) -> None:
    async def connector(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        return CredentialedStream(ExpiringCredentials(trio.current_time() + 60))

    pool = ConnectionPool(connector)
    ep = Endpoint(address="10.0.0.1", port=8080)
    up = await pool.acquire(ep, 80)
    _finish(up)
    up.stream.credentials.revoked = True  # type: ignore[attr-defined]
    await pool.release(up)
    assert pool.idle_count() == 0
    assert pool.stats.retired == 1
    assert pool.stats.closed == 1
    await pool.aclose()
