"""The relay's fast path across a real HBONE leg (no root): app ↔ relay ↔ CONNECT stream over
TLS ↔ relay ↔ server.

Both agents' relays run in this process over loopback TCP, each between a `trio.SocketStream`
and an `HboneStream`, exactly the pairs the agent relays; the generic path (`fast=False`) must
give the same bytes, counts and half-close behaviour (END_STREAM passed on as EOF).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
from pki import LocalIdentityProvider, ThrowawayCA, spiffe

from nodeagent.proxy import relay as relay_module
from nodeagent.proxy.relay import RelayResult, relay
from nodeagent.sockio import SockEnd
from nodeagent.tunnel import ConnectRequest, HboneConnection, HboneStream
from nodeagent.tunnel.server import detach
from nodeagent.tunnel.tls import TlsStream

A, B = spiffe("a", "client"), spiffe("b", "server")


@pytest.fixture
def ids() -> Iterator[LocalIdentityProvider]:
    provider = LocalIdentityProvider(ThrowawayCA())
    provider.ensure(A)
    provider.ensure(B)
    yield provider
    provider.close()


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    await listener.aclose()
    return client, accepted[0]


async def tls_pair(ids: LocalIdentityProvider) -> tuple[TlsStream, TlsStream]:
    c, s = await tcp_pair()
    cs = TlsStream.wrap(detach(c), ids.client_context(A), server_side=False)
    ss = TlsStream.wrap(detach(s), ids.server_context(B), server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cs.do_handshake)
        nursery.start_soon(ss.do_handshake)
    return cs, ss


@asynccontextmanager
async def hbone_pair(
    ids: LocalIdentityProvider,
) -> AsyncIterator[tuple[HboneStream, HboneStream, HboneConnection]]:
    """One CONNECT stream: (client side, server side, the server's connection)."""
    cs, ss = await tls_pair(ids)
    client = HboneConnection(cs, client=True, peer_identity=B, peer_certificate=b"")
    server = HboneConnection(ss, client=False, peer_identity=A, peer_certificate=b"")
    send, receive = trio.open_memory_channel[HboneStream](1)
    done = trio.Event()

    async def handler(stream: HboneStream) -> None:
        await stream.respond(200)
        await send.send(stream)
        await done.wait()  # the stream's owner (the relay) closes it

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        nursery.start_soon(server.run, handler)
        out = await client.open_stream(ConnectRequest("127.0.0.1", 9))
        yield out, await receive.receive(), server
        done.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fast", [True, False])
async def test_two_relays_over_tls_bulk_both_ways_and_half_close(
    ids: LocalIdentityProvider, fast: bool
) -> None:
    async with hbone_pair(ids) as (tunnel_out, tunnel_in, _):  # agent 1 → agent 2
        await _bulk(tunnel_out, tunnel_in, fast)


async def _bulk(tunnel_out: HboneStream, tunnel_in: HboneStream, fast: bool) -> None:
    app, agent1_down = await tcp_pair()  # the app's connection, captured by agent 1
    agent2_up, server = await tcp_pair()  # agent 2 → the destination app
    upload = os.urandom(5 * 1024 * 1024 + 7)
    download = os.urandom(3 * 1024 * 1024 + 3)
    results: dict[str, RelayResult] = {}

    async def agent(
        name: str, down: trio.abc.HalfCloseableStream, up: trio.abc.HalfCloseableStream
    ) -> None:
        results[name] = await relay(down, up, idle_timeout=30, fast=fast)

    async def client() -> None:
        async def send() -> None:
            await app.send_all(upload)
            await app.send_eof()  # half-close: the download must still arrive

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got = bytearray()
            while chunk := await app.receive_some(65536):
                got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()
        await app.aclose()

    async def destination() -> None:
        h = hashlib.sha256()
        while chunk := await server.receive_some(65536):
            h.update(chunk)
        assert h.digest() == hashlib.sha256(upload).digest()  # EOF came through both agents
        await server.send_all(download)
        await server.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent, "n1", agent1_down, tunnel_out)
            nursery.start_soon(agent, "n2", tunnel_in, agent2_up)
            nursery.start_soon(client)
            nursery.start_soon(destination)
    for name in ("n1", "n2"):
        assert (results[name].sent, results[name].received) == (len(upload), len(download))
        assert results[name].error == ""
    assert len(relay_module._pool) <= relay_module.POOL_SIZE
    assert len(relay_module._big_pool) <= relay_module.POOL_SIZE


async def test_request_response_keeps_message_boundaries_latency_path(
    ids: LocalIdentityProvider,
) -> None:
    """Small messages on a persistent connection, the L4 bench's pattern: every reply arrives
    before the next request (a relay that waited for a full buffer would hang here)."""
    async with hbone_pair(ids) as (tunnel_out, tunnel_in, _):
        await _round_trips(tunnel_out, tunnel_in)


async def _round_trips(tunnel_out: HboneStream, tunnel_in: HboneStream) -> None:
    app, agent1_down = await tcp_pair()
    agent2_up, server = await tcp_pair()

    async def echo() -> None:
        while data := await server.receive_some(65536):
            await server.send_all(data)
        await server.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, agent1_down, tunnel_out)
            nursery.start_soon(relay, tunnel_in, agent2_up)
            nursery.start_soon(echo)
            for i in range(300):
                msg = i.to_bytes(4, "big") * 16
                await app.send_all(msg)
                got = b""
                while len(got) < len(msg):
                    got += await app.receive_some(64)
                assert got == msg
            await app.aclose()


async def test_reset_on_the_tls_leg_ends_both_relays(ids: LocalIdentityProvider) -> None:
    app, agent1_down = await tcp_pair()
    results: list[RelayResult] = []
    async with hbone_pair(ids) as (tunnel_out, tunnel_in, server_conn):

        async def agent1() -> None:
            results.append(await relay(agent1_down, tunnel_out, idle_timeout=30))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent1)
                await app.send_all(b"hello")
                assert await tunnel_in.receive_some(5) == b"hello"
                server_conn.tls.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                server_conn.fail("test: reset")  # RST under the TLS leg
                # The app sees its connection end (EOF or reset), not a hang.
                try:
                    rest = await app.receive_some(10)
                except trio.BrokenResourceError:
                    rest = b""
                assert rest == b""
                await app.aclose()
    assert results[0].sent == 5
    assert results[0].received == 0
    assert results[0].error  # a reset, not a clean end


async def test_data_into_a_waiting_relay_goes_through_the_sink(
    ids: LocalIdentityProvider, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of an HBONE stream into a socket: while the relay waits, the connection's reader
    writes arriving DATA to the socket itself (the stream's `sink`), counts it, and it keeps
    the idle timeout from firing; once the traffic stops the relay ends at the timeout."""
    direct: list[int] = []
    try_write = SockEnd.try_write

    def counted(self: SockEnd, data: bytes) -> int:
        direct.append(len(data))
        return try_write(self, data)

    monkeypatch.setattr(SockEnd, "try_write", counted)
    async with hbone_pair(ids) as (tunnel_out, tunnel_in, _):
        app, agent_down = await tcp_pair()
        results: list[RelayResult] = []

        async def run_relay() -> None:
            results.append(await relay(agent_down, tunnel_out, idle_timeout=30))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            await trio.sleep(1)
            assert tunnel_out.sink is not None  # the relay waits on the stream
            for i in range(4):
                msg = bytes([i]) * 100
                await tunnel_in.send_all(msg)
                got = b""
                while len(got) < len(msg):
                    got += await app.receive_some(1000)
                assert got == msg
                assert not tunnel_out._chunks  # nothing was queued for the pump
                await trio.sleep(20)  # below the idle timeout: the sink's writes count
        assert results[0].received == 400
        assert direct == [100] * 4  # each message written by the reader, none by the pump
        assert results[0].error == "idle for 30s"
        assert tunnel_out.sink is None
        await app.aclose()
