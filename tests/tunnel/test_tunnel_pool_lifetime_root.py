"""The HTTP pool over real tunnels (HBONE streams from a `TunnelPool`, `accept_hbone` serving
them, real TLS 1.3 on loopback) with a
short-lived server certificate: a pooled tunnel is reused while both certificates hold and is
replaced once the server's expired, long before the pool's idle timeout; a rotation of the
client's certificate retires it too. Trio's MockClock stands for the passing of time.

Root: the tunnel pool creates its sockets through a Netns (here this process's own namespace, to
127.0.0.1 only).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import h11
import pytest
import trio
import trio.testing
from pki import LocalIdentityProvider, ThrowawayCA, spiffe

from nodeagent.http.pool import ConnectionPool, UpstreamConnection
from nodeagent.inpod import Netns
from nodeagent.snapshot.model import Endpoint
from nodeagent.tunnel import ConnectRequest, HboneStream, TunnelPool, accept_hbone

pytestmark = pytest.mark.root

CLIENT, SERVER = spiffe("a", "client"), spiffe("b", "server")
SERVER_TTL = 30.0


@pytest.fixture
def ids() -> Iterator[LocalIdentityProvider]:
    provider = LocalIdentityProvider(ThrowawayCA())
    provider.ensure(CLIENT)
    provider.ttl = SERVER_TTL
    provider.ensure(SERVER)
    yield provider
    provider.close()


async def _serve_http(ids: LocalIdentityProvider, raw: socket.socket) -> None:
    hconn, _ = await accept_hbone(raw, identities=ids, identity=SERVER)
    await hconn.run(_serve_stream)


async def _serve_stream(stream: HboneStream) -> None:
    await stream.respond(200)
    conn = h11.Connection(h11.SERVER)
    with trio.CancelScope() as scope:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                conn.receive_data(data)
                if not data:
                    break
            elif isinstance(event, h11.EndOfMessage):
                body = b"ok"
                head = h11.Response(status_code=200, headers=[("content-length", "2")])
                await stream.send_all(conn.send(head) + conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                break
    assert not scope.cancelled_caught
    await stream.aclose()


@pytest.fixture
async def server(ids: LocalIdentityProvider, nursery: trio.Nursery) -> AsyncIterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)

    async def accept_loop() -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            raw, _ = listener.accept()
            nursery.start_soon(_serve_http, ids, raw)

    nursery.start_soon(accept_loop)
    yield listener.getsockname()[1]
    listener.close()


async def _get(pool: ConnectionPool, endpoint: Endpoint) -> UpstreamConnection:
    up = await pool.acquire(endpoint, 80, idle_timeout=3600)
    await up.send(h11.Request(method="GET", target="/", headers=[("Host", "web")]))
    await up.send(h11.EndOfMessage())
    while not isinstance(event := await up.next_event(), h11.EndOfMessage):
        assert not isinstance(event, h11.ConnectionClosed)
    await pool.release(up)
    return up


async def test_pooled_tunnels_end_with_the_certificates(
    ids: LocalIdentityProvider,
    server: int,
    mock_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    netns = Netns.open("/proc/self/ns/net")
    tunnels = TunnelPool(netns=netns, identities=ids, port=server)
    await nursery.start(tunnels.run)

    async def connector(endpoint: Endpoint, service_port: int) -> trio.abc.Stream:
        stream, _ = await tunnels.open_stream(
            source_identity=CLIENT,
            expected_identity=SERVER,
            request=ConnectRequest(endpoint.address, endpoint.port),
        )
        return stream

    pool = ConnectionPool(connector)
    endpoint = Endpoint(address="127.0.0.1", port=8080)
    try:
        first = await _get(pool, endpoint)
        mock_clock.jump(SERVER_TTL / 2)
        assert await _get(pool, endpoint) is first  # both certificates hold: reused
        assert (pool.stats.connects, pool.stats.reuses) == (1, 1)

        mock_clock.jump(SERVER_TTL / 2 + 1)  # past the server's notAfter, far below 1 h idle
        second = await _get(pool, endpoint)
        assert second is not first
        assert (pool.stats.connects, pool.stats.retired) == (2, 1)

        ids.release(CLIENT)
        ids.ensure(CLIENT)  # the client's certificate rotates
        third = await _get(pool, endpoint)
        assert third is not second
        assert (pool.stats.connects, pool.stats.retired) == (3, 2)
        # The tunnel pool retired the HBONE connections the same way (a new one each time).
        assert tunnels.statistics()["connections_opened"] == 3
    finally:
        await pool.aclose()
        await tunnels.aclose()
        netns.close()
