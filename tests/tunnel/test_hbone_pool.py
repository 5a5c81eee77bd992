"""The HBONE pool between two real pod namespaces: streams multiplexed on one TLS connection,
the streams limit, idle release, a half-open connection replaced, revocation closing a pooled
connection's streams. Counted by the pool's statistics and the server's accepted connections."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
import trio
from tunnel_net import (
    A_IP,
    APP_PORT,
    B_IP,
    Mesh,
    Namespaces,
    namespaces,
    open_stream,
    running_mesh,
    settled,
)

from nodeagent.contract import TUNNEL_PORT
from nodeagent.tunnel import HboneStream, TunnelPool

pytestmark = pytest.mark.root
__all__ = ["namespaces"]


def _pool(mesh: Mesh, **kw: float) -> TunnelPool:
    core = mesh.a.core
    return TunnelPool(netns=core.netns, identities=core.identities, **kw)  # type: ignore[arg-type]


async def _echo(stream: HboneStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    await stream.send_eof()
    got = b""
    while chunk := await stream.receive_some(65536):
        got += chunk
    return got


def _expect(payload: bytes) -> bytes:
    return f"{A_IP} {hashlib.sha256(payload).hexdigest()}".encode()


async def _wait(cond: Callable[[], bool], what: str) -> None:
    """Bounded wait (5 s) for `cond`, polled as tests/tunnel's other waits are."""
    for _ in range(500):
        if cond():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"not within 5 s: {what}")


async def _iptables(netns: str, *args: str) -> None:
    await trio.run_process(["ip", "netns", "exec", netns, "iptables", *args])


async def _read_to_end(stream: HboneStream) -> None:
    while await stream.receive_some(100):
        pass


async def test_concurrent_app_connections_share_one_tls_connection(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        streams = [(await open_stream(mesh, APP_PORT))[0] for _ in range(20)]
        async with trio.open_nursery() as nursery:
            for i, s in enumerate(streams):

                async def one(s: HboneStream = s, i: int = i) -> None:
                    assert await _echo(s, b"n%d" % i) == _expect(b"n%d" % i)
                    await s.aclose()

                nursery.start_soon(one)
        stats = mesh.a.core.pool.statistics()
        assert (stats["connections_opened"], stats["streams_opened"]) == (1, 20)
        assert stats["streams_reused"] == 19
        await settled(mesh.a, mesh.b)
        inbound = mesh.b.statistics()["inbound"]
        assert (inbound["tunnel_connections"], inbound["opened"]) == (1, 20)


async def test_the_101st_stream_opens_a_second_connection(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        streams = [(await open_stream(mesh, APP_PORT))[0] for _ in range(101)]
        stats = mesh.a.core.pool.statistics()
        assert (stats["connections"], stats["streams"]) == (2, 101)
        for s in streams:
            await s.aclose()
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["tunnel_connections"] == 2


async def test_an_idle_connection_is_released(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        pool = _pool(mesh, idle_timeout=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            stream, _ = await open_stream(mesh, APP_PORT, pool=pool)
            assert await _echo(stream, b"x") == _expect(b"x")
            await stream.aclose()
            assert pool.statistics()["connections"] == 1
            await _wait(lambda: pool.statistics()["connections"] == 0, "idle connection closed")
            assert pool.statistics()["idle_closed"] == 1
            assert pool.statistics()["opener_locks"] == 0  # forgotten with the connection
            # The next stream opens a fresh connection.
            stream, info = await open_stream(mesh, APP_PORT, pool=pool)
            assert not info.reused
            assert await _echo(stream, b"y") == _expect(b"y")
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_half_open_connection_is_replaced(namespaces: Namespaces) -> None:
    """The pooled connection's packets are dropped (no FIN, no RST: a peer gone silently). The
    next stream's PING goes unanswered, so the pool replaces the connection and the stream
    succeeds on a new one instead of failing."""
    async with running_mesh(namespaces) as mesh:
        pool = _pool(mesh, ping_interval=0.2, ping_timeout=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            stream, _ = await open_stream(mesh, APP_PORT, pool=pool)
            assert await _echo(stream, b"x") == _expect(b"x")
            await stream.aclose()
            (entry,) = pool.book.entries()
            sport = entry.conn.tls.socket.getsockname()[1]
            rule = ["OUTPUT", "-p", "tcp", "-d", B_IP, "--dport", str(TUNNEL_PORT)]
            rule += ["--sport", str(sport), "-j", "DROP"]
            netns = namespaces.names[0]
            await _iptables(netns, "-I", *rule)
            try:
                await trio.sleep(0.3)  # past ping_interval: the pool must ask before reusing
                with trio.fail_after(5):
                    stream, info = await open_stream(mesh, APP_PORT, pool=pool)
                assert not info.reused
                assert await _echo(stream, b"y") == _expect(b"y")
                await stream.aclose()
                stats = pool.statistics()
                assert (stats["replaced"], stats["connections_opened"]) == (1, 2)
            finally:
                with trio.CancelScope(shield=True):
                    await _iptables(netns, "-D", *rule)
            nursery.cancel_scope.cancel()


async def test_revocation_closes_a_pooled_connection_and_its_streams(
    namespaces: Namespaces,
) -> None:
    async with running_mesh(namespaces) as mesh:
        streams = [(await open_stream(mesh, APP_PORT))[0] for _ in range(3)]
        for s in streams:
            await s.send_all(b"hello")
        await _wait(lambda: len(mesh.b.inbound.live) == 3, "3 streams registered at B")
        mesh.identities.revoke(mesh.a.core.workload.identity)  # type: ignore[union-attr]
        with trio.fail_after(3):
            for s in streams:
                with pytest.raises(trio.BrokenResourceError):
                    await _read_to_end(s)
        await _wait(lambda: mesh.a.core.pool.statistics()["connections"] == 0, "pool emptied")
        for s in streams:
            await s.aclose()
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["closed_by_policy"] == 3
        assert not mesh.b.inbound.tunnels


async def test_a_draining_destination_moves_new_streams_and_finishes_the_open_one(
    namespaces: Namespaces,
) -> None:
    """The destination agent drains (a graceful restart): a graceful GOAWAY on its HBONE
    connection. The stream under way still carries bytes both ways; the next stream opens a
    new connection; the old one closes once its stream ended."""
    async with running_mesh(namespaces) as mesh:
        pool = mesh.a.core.pool
        under_way, _ = await open_stream(mesh, APP_PORT)
        await under_way.send_all(b"before ")
        (drained,) = mesh.b.inbound.tunnels
        drained.drain()  # (the agent's drain does it to all, and to any accepted later)
        await _wait(lambda: pool.book.entries()[0].conn.goaway, "the source saw the GOAWAY")
        fresh, info = await open_stream(mesh, APP_PORT)
        assert not info.reused
        assert pool.statistics()["connections_opened"] == 2
        assert await _echo(fresh, b"fresh") == _expect(b"fresh")
        await fresh.aclose()
        # The drained connection still serves its stream, both ways (h2 alone would refuse).
        assert await _echo(under_way, b"after") == _expect(b"before after")
        await under_way.aclose()
        await _wait(lambda: pool.statistics()["connections"] == 1, "the drained one closed")
        await _wait(lambda: len(mesh.b.inbound.tunnels) == 1, "the destination closed it too")
