"""Measure the tunnel's TLS choices on loopback (not a test): `python tests/tunnel/measure_tls.py`.

1. Bulk: TlsStream (its own memory BIOs + trio readiness) against trio.SSLStream, one sender
   and one receiver task in one process, TLS 1.3, P-256 certificates from a throwaway CA.
2. Handshakes: full against resumed (TLS 1.3 session tickets), sequential, client + server in
   one process, so each figure is the CPU cost of both ends.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))
from pki import LocalIdentityProvider, ThrowawayCA, spiffe

from nodeagent.tunnel.tls import TlsStream

A, B = spiffe("a", "client"), spiffe("b", "server")
CHUNK = 256 * 1024


def pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


async def bulk_tlsstream(ids: LocalIdentityProvider, total: int) -> float:
    c, s = pair()
    cs = TlsStream.wrap(c, ids.client_context(A), server_side=False)
    ss = TlsStream.wrap(s, ids.server_context(B), server_side=True)
    async with trio.open_nursery() as n:
        n.start_soon(cs.do_handshake)
        n.start_soon(ss.do_handshake)
    return await _bulk(cs.send_all, ss.receive_some, cs.aclose, ss.aclose, total)


async def bulk_sslstream(ids: LocalIdentityProvider, total: int) -> float:
    c, s = pair()
    cs = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(c)), ids.client_context(A))
    ss = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(s)),
        ids.server_context(B),
        server_side=True,
    )
    async with trio.open_nursery() as n:
        n.start_soon(cs.do_handshake)
        n.start_soon(ss.do_handshake)
    return await _bulk(cs.send_all, ss.receive_some, cs.aclose, ss.aclose, total)


async def _bulk(
    send: Callable[[bytes], Awaitable[None]],
    receive: Callable[[int], Awaitable[bytes]],
    close_a: Callable[[], Awaitable[None]],
    close_b: Callable[[], Awaitable[None]],
    total: int,
) -> float:
    block = b"x" * CHUNK
    got = 0

    async def sender() -> None:
        for _ in range(total // CHUNK):
            await send(block)

    async def receiver() -> None:
        nonlocal got
        while got < total:
            got += len(await receive(CHUNK))

    start = time.perf_counter()
    async with trio.open_nursery() as n:
        n.start_soon(sender)
        n.start_soon(receiver)
    elapsed = time.perf_counter() - start
    await close_a()
    await close_b()
    return total * 8 / elapsed / 1e9


async def handshakes(ids: LocalIdentityProvider, n: int, *, resume: bool) -> float:
    session: ssl.SSLSession | None = None
    cctx, sctx = ids.client_context(A), ids.server_context(B)
    times = []
    for _ in range(n):
        c, s = pair()
        start = time.perf_counter()
        cs = TlsStream.wrap(c, cctx, server_side=False, session=session if resume else None)
        ss = TlsStream.wrap(s, sctx, server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cs.do_handshake)
            nursery.start_soon(ss.do_handshake)
        # Tickets arrive after the handshake: one round trip of data delivers them.
        await ss.send_all(b"k")
        await cs.receive_some(1)
        times.append(time.perf_counter() - start)
        if resume:
            assert session is None or cs.session_reused
            session = cs.session
        await cs.aclose()
        await ss.aclose()
    times.sort()
    return times[len(times) // 2] * 1000


async def main() -> None:
    ids = LocalIdentityProvider(ThrowawayCA())
    ids.ensure(A)
    ids.ensure(B)
    total = 1 << 30 if "--quick" not in sys.argv else 1 << 26
    for name, fn in (
        ("TlsStream (memory BIOs)", bulk_tlsstream),
        ("trio.SSLStream", bulk_sslstream),
    ):
        runs = [await fn(ids, total) for _ in range(2)]
        print(f"bulk 1 GiB {name}: {max(runs):.2f} Gbit/s (best of 2: {runs})")
    full = await handshakes(ids, 200, resume=False)
    resumed = await handshakes(ids, 200, resume=True)
    print(f"handshake+1 byte, median of 200: full {full:.3f} ms, resumed {resumed:.3f} ms")
    ids.close()


if __name__ == "__main__":
    trio.run(main)
