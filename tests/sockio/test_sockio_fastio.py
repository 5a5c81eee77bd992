"""FastIO over real sockets: bytes in order both ways, back-pressure, EOF, errors, fairness."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nodeagent.sockio import YIELD_EVERY, FastIO, HboneEnd, SockEnd

TUNNEL_TESTS = str(Path(__file__).resolve().parent.parent / "tunnel")  # pki.py: test TLS identities


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def round_trip(fa: FastIO, fb: FastIO, close_b: Any, payload: bytes) -> None:
    """`payload` from a to b while b reads, a reply back, then b's close seen as EOF by a."""
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(payload):
            data = await fb.receive_some(65536)
            assert data
            got.extend(data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await fa.send_all(payload)
        assert bytes(got) == payload
        await fb.send_all(b"pong")
        assert await fa.receive_some(100) == b"pong"
        await close_b()
        assert await fa.receive_some(100) == b""


async def test_socket_stream_moves_bytes_both_ways_and_sees_eof() -> None:
    a, b = socket_pair()
    fa, fb = FastIO(a), FastIO(b)
    assert isinstance(fa._end, SockEnd)  # the fast path, not the stream's own methods
    # 2 MiB: more than the socket buffers, so send waits
    await round_trip(fa, fb, b.aclose, bytes(range(256)) * 8192)
    await a.aclose()


async def test_errors_are_trio_errors() -> None:
    a, b = socket_pair()
    fa = FastIO(a)
    await b.aclose()

    async def write_until_it_fails() -> None:
        for _ in range(1000):  # the first writes may still be accepted by the kernel
            await fa.send_all(b"x" * 65536)

    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match="send"):
        await write_until_it_fails()
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await fa.receive_some(10)


async def test_a_stream_that_is_always_ready_still_lets_others_run() -> None:
    a, b = socket_pair()
    fa = FastIO(a)
    others = 0

    async def other() -> None:
        nonlocal others
        while True:
            others += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # `other` is running now
        before = others
        for _ in range(YIELD_EVERY * 4):
            await fa.send_all(b"x")  # never has to wait: only the fairness checkpoints yield
        assert others - before >= 3
        nursery.cancel_scope.cancel()
    await a.aclose()
    await b.aclose()


async def test_other_streams_use_their_own_methods() -> None:
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FastIO(a), FastIO(b)
    assert fa._end is None
    await fa.send_all(b"hello")
    assert await fb.receive_some(100) == b"hello"


async def test_hbone_stream_moves_bytes_both_ways_and_sees_eof() -> None:
    # One CONNECT stream over the tunnel's TLS, as the agent's upstream connections are
    # (tests/tunnel helpers); END_STREAM is the EOF.
    sys.path.insert(0, TUNNEL_TESTS)
    from pki import LocalIdentityProvider, ThrowawayCA, spiffe

    from nodeagent.tunnel import ConnectRequest, HboneConnection, HboneStream
    from nodeagent.tunnel.server import detach
    from nodeagent.tunnel.tls import TlsStream

    a_id, b_id = spiffe("a", "client"), spiffe("b", "server")
    ids = LocalIdentityProvider(ThrowawayCA())
    try:
        ids.ensure(a_id)
        ids.ensure(b_id)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        await listener.aclose()
        a = TlsStream.wrap(detach(client), ids.client_context(a_id), server_side=False)
        b = TlsStream.wrap(detach(server), ids.server_context(b_id), server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.do_handshake)
            nursery.start_soon(b.do_handshake)
        ca = HboneConnection(a, client=True, peer_identity=b_id, peer_certificate=b"")
        cb = HboneConnection(b, client=False, peer_identity=a_id, peer_certificate=b"")
        accepted: list[HboneStream] = []
        done = trio.Event()

        async def handler(stream: HboneStream) -> None:
            accepted.append(stream)  # before the 200: the client may run on at once
            await stream.respond(200)
            await done.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ca.run)
            nursery.start_soon(cb.run, handler)
            sa = await ca.open_stream(ConnectRequest("127.0.0.1", 9))
            fa, fb = FastIO(sa), FastIO(accepted[0])
            assert isinstance(fa._end, HboneEnd)
            await round_trip(fa, fb, accepted[0].send_eof, os.urandom(1 << 20))
            done.set()
            nursery.cancel_scope.cancel()
    finally:
        ids.close()
