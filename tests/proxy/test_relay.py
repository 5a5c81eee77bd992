"""The relay over real loopback sockets: bytes both ways, half-close, idle timeout."""

from __future__ import annotations

import hashlib
import os

import trio

from nodeagent.proxy.relay import relay


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    await listener.aclose()
    return client, accepted[0]


async def test_relays_both_ways_with_half_close() -> None:
    app_client, proxy_down = await _pair()  # app ↔ proxy (downstream side)
    proxy_up, server = await _pair()  # proxy ↔ server (upstream side)
    payload = os.urandom(3 * 1024 * 1024)
    results = []

    async def run_relay() -> None:
        results.append(await relay(proxy_down, proxy_up))

    async def client_side() -> None:
        await app_client.send_all(payload)
        await app_client.send_eof()  # half-close: the reply must still arrive
        got = bytearray()
        while chunk := await app_client.receive_some(65536):
            got += chunk
        assert got == b"digest:" + hashlib.sha256(payload).hexdigest().encode()
        await app_client.aclose()

    async def server_side() -> None:
        h = hashlib.sha256()
        while chunk := await server.receive_some(65536):
            h.update(chunk)
        await server.send_all(b"digest:" + h.hexdigest().encode())
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay)
        nursery.start_soon(client_side)
        nursery.start_soon(server_side)
    assert results[0].sent == len(payload)
    assert results[0].received == len(b"digest:") + 64
    assert results[0].error == ""


async def test_idle_timeout_closes_both_sides(autojump_clock: trio.abc.Clock) -> None:
    app_client, proxy_down = await _pair()
    proxy_up, server = await _pair()
    result = await relay(proxy_down, proxy_up, idle_timeout=30)
    assert result.error == "idle for 30s"
    assert await app_client.receive_some(10) == b""  # the proxy closed the client side
    assert await server.receive_some(10) == b""
    await app_client.aclose()
    await server.aclose()


async def test_reset_upstream_ends_relay() -> None:
    app_client, proxy_down = await _pair()
    proxy_up, server = await _pair()
    async with trio.open_nursery() as nursery:
        results = []

        async def run_relay() -> None:
            results.append(await relay(proxy_down, proxy_up))

        nursery.start_soon(run_relay)
        await app_client.send_all(b"hello")
        assert await server.receive_some(5) == b"hello"
        server.socket.setsockopt(
            trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await server.aclose()  # RST
    assert results[0].sent == 5
    assert results[0].error
    await app_client.aclose()


async def test_traffic_moves_the_idle_deadline(autojump_clock: trio.abc.Clock) -> None:
    """Bytes every 20 s keep a 30 s idle timeout from firing; after the last byte the relay
    ends 30 s later, at most the slack (5%) past it."""
    app_client, proxy_down = await _pair()
    proxy_up, server = await _pair()
    ended: list[float] = []

    async def run_relay() -> None:
        result = await relay(proxy_down, proxy_up, idle_timeout=30)
        assert result.error == "idle for 30s"
        assert result.sent == 5
        ended.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay)
        for _ in range(5):
            await trio.sleep(20)
            await app_client.send_all(b"x")
            assert await server.receive_some(10) == b"x"
        last = trio.current_time()
    assert 30 <= ended[0] - last <= 30 * 1.05 + 0.01
    await app_client.aclose()
    await server.aclose()
