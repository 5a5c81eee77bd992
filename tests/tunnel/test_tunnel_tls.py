"""TlsStream over real loopback TCP (no root): bulk, half-close both ways, resumption, errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from pki import LocalIdentityProvider, ThrowawayCA, spiffe

from nodeagent.tunnel import SessionCache, TlsStream
from nodeagent.tunnel.tls import WANT_READ

A, B = spiffe("a", "client"), spiffe("b", "server")


@pytest.fixture
def ids() -> Iterator[LocalIdentityProvider]:
    provider = LocalIdentityProvider(ThrowawayCA())
    provider.ensure(A)
    provider.ensure(B)
    yield provider
    provider.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


async def connected(
    ids: LocalIdentityProvider,
    session: ssl.SSLSession | None = None,
    pair: Callable[[], tuple[socket.socket, socket.socket]] = tcp_pair,
) -> tuple[TlsStream, TlsStream]:
    c, s = pair()
    cs = TlsStream.wrap(c, ids.client_context(A), server_side=False, session=session)
    ss = TlsStream.wrap(s, ids.server_context(B), server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cs.do_handshake)
        nursery.start_soon(ss.do_handshake)
    return cs, ss


async def read_all(stream: TlsStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


async def test_bulk_and_half_close_each_way(ids: LocalIdentityProvider) -> None:
    cs, ss = await connected(ids)
    assert ids.peer_identity(cs.peer_certificate()) == B
    assert ids.peer_identity(ss.peer_certificate()) == A
    payload = os.urandom(16 * 1024 * 1024)

    async def client() -> None:
        await cs.send_all(payload)
        await cs.send_eof()  # the reply must still arrive after our EOF
        assert await read_all(cs) == hashlib.sha256(payload).digest()

    async def server() -> None:
        data = await read_all(ss)
        assert data == payload
        await ss.send_all(hashlib.sha256(data).digest())
        await ss.send_eof()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            nursery.start_soon(server)
    await cs.aclose()
    await ss.aclose()


async def test_send_after_eof_is_an_error(ids: LocalIdentityProvider) -> None:
    cs, ss = await connected(ids)
    await cs.send_eof()
    await cs.send_eof()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await cs.send_all(b"late")
    assert await ss.receive_some(10) == b""
    await cs.aclose()
    await ss.aclose()


async def test_abrupt_peer_close_reads_as_eof_or_broken(ids: LocalIdentityProvider) -> None:
    cs, ss = await connected(ids)
    await ss.aclose()  # no close_notify: a ragged EOF
    with contextlib.suppress(trio.BrokenResourceError):
        assert await cs.receive_some(10) == b""
    await cs.aclose()


async def test_session_resumption_and_cache(ids: LocalIdentityProvider) -> None:
    cache = SessionCache(size=2)
    ctx = ids.client_context(A)
    key = (A, "127.0.0.1", B)
    cs, ss = await connected(ids)
    await ss.send_all(b"k")  # tickets travel after the handshake, before this byte
    assert await cs.receive_some(1) == b"k"
    assert not cs.session_reused
    assert cs.session is not None
    cache.put(key, ctx, cs.session)
    for s in (cs, ss):
        await s.aclose()
    cs, ss = await connected(ids, session=cache.get(key, ctx))
    assert cs.session_reused
    assert ss.session_reused
    for s in (cs, ss):
        await s.aclose()
    # A session is never offered with another context (a rotated certificate).
    assert cache.get(key, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)) is None
    # Bounded: the least recently used goes.
    session = cache.get(key, ctx)
    assert session is not None
    cache.put((A, "x", B), ctx, session)
    cache.put((A, "y", B), ctx, session)
    assert len(cache) == 2
    assert cache.get(key, ctx) is None


async def test_handshake_fails_against_another_ca(ids: LocalIdentityProvider) -> None:
    rogue = LocalIdentityProvider(ThrowawayCA("rogue"))
    rogue.ensure(B)
    try:
        c, s = tcp_pair()
        cs = TlsStream.wrap(c, ids.client_context(A), server_side=False)
        ss = TlsStream.wrap(s, rogue.server_context(B), server_side=True)
        errors: list[BaseException] = []

        async def shake(stream: TlsStream) -> None:
            try:
                await stream.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                errors.append(exc)
                await stream.aclose()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shake, cs)
                nursery.start_soon(shake, ss)
        assert any("certificate verify failed" in str(e) for e in errors), errors
        # The client's alert reached the server (OpenSSL wrote it into memory: it must be sent
        # before the error is raised), so the server knows why rather than seeing a bare EOF.
        assert any("alert unknown ca" in str(e) for e in errors), errors
        await cs.aclose()
        await ss.aclose()
    finally:
        rogue.close()


async def test_try_receive_into_takes_every_ready_record_at_once(
    ids: LocalIdentityProvider,
) -> None:
    cs, ss = await connected(ids)
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    assert ss.try_receive_into(view) == WANT_READ  # nothing sent yet: no wait, no bytes
    payload = os.urandom(64 * 1024)  # four 16 KiB TLS records
    await cs.send_all(payload)
    # Loopback queues the sender's bytes before send returns; one call must decrypt them all
    # (one SSL_read alone returns a single record).
    got = bytearray()
    with trio.fail_after(10):
        while len(got) < len(payload):
            n = ss.try_receive_into(view)
            if n == WANT_READ:
                await trio.lowlevel.wait_readable(ss.socket)
                continue
            assert n > 16384 or not got, n
            got += view[:n]
    assert got == payload
    assert ss.drained or ss.try_receive_into(view) == WANT_READ
    await cs.send_eof()
    with trio.fail_after(10):
        while (n := ss.try_receive_into(view)) == WANT_READ:
            await trio.lowlevel.wait_readable(ss.socket)
    assert n == 0  # close_notify reads as EOF, and keeps reading as EOF
    assert ss.try_receive_into(view) == 0
    await cs.aclose()
    await ss.aclose()


async def test_try_receive_into_after_a_reset_ends_without_hanging(
    ids: LocalIdentityProvider,
) -> None:
    cs, ss = await connected(ids)
    await cs.send_all(b"last words")
    cs.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await cs.aclose()  # RST, no close_notify
    view = memoryview(bytearray(1024))
    outcome: int | str = WANT_READ
    with trio.fail_after(10):
        while outcome == WANT_READ or (isinstance(outcome, int) and outcome > 0):
            try:
                outcome = ss.try_receive_into(view)
            except trio.BrokenResourceError as exc:
                outcome = str(exc)
            if outcome == WANT_READ:
                await trio.lowlevel.wait_readable(ss.socket)
    # Like receive_some: a ragged end reads as EOF (suppress_ragged_eofs) or as broken.
    assert outcome == 0 or "tls receive" in str(outcome)
    await ss.aclose()


async def test_send_all_nowait_then_receive(ids: LocalIdentityProvider) -> None:
    cs, ss = await connected(ids)
    payload = os.urandom(3 * 1024 * 1024)  # more than the socket buffers: must wait inside

    async def reader() -> None:
        assert await read_all(ss) == payload

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await cs.send_all_nowait(memoryview(payload))
            await cs.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await cs.send_all_nowait(memoryview(b"late"))
    await cs.aclose()
    await ss.aclose()


class CountingSocket(socket.socket):
    """A real socket that counts the send and recv_into calls made on it."""

    sends = 0
    recvs = 0

    def send(self, data: Any, flags: int = 0) -> int:
        self.sends += 1
        return super().send(data, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.recvs += 1
        return super().recv_into(buffer, nbytes, flags)


def counting(sock: socket.socket) -> CountingSocket:
    return CountingSocket(fileno=sock.detach())


async def test_ciphertext_crosses_the_kernel_in_large_reads_and_writes(
    ids: LocalIdentityProvider,
) -> None:
    def counted_pair() -> tuple[socket.socket, socket.socket]:
        c, s = tcp_pair()
        return counting(c), counting(s)

    cs, ss = await connected(ids, pair=counted_pair)
    csock, ssock = cs.socket, ss.socket
    assert isinstance(csock, CountingSocket)
    assert isinstance(ssock, CountingSocket)
    csock.sends = ssock.recvs = 0
    payload = os.urandom(4 * 1024 * 1024)  # 256 TLS records of 16 KiB
    got = bytearray()
    view = memoryview(bytearray(256 * 1024))

    async def reader() -> None:
        while len(got) < len(payload):
            n = ss.try_receive_into(view)
            if n == WANT_READ:
                await trio.lowlevel.wait_readable(ss.socket)
                continue
            assert n > 0
            got.extend(view[:n])

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await cs.send_all_nowait(memoryview(payload))
    assert got == payload
    # OpenSSL on the socket itself writes each record with its own syscall and reads a record
    # with two (header, then body): 256 and 512 here. Through memory, one send carries a 64 KiB
    # step's records (plus the ones the full socket splits) and one recv whatever is queued.
    assert 64 <= csock.sends < 128, csock.sends
    assert ssock.recvs < 256, ssock.recvs
    await cs.aclose()
    await ss.aclose()


async def test_try_send_keeps_the_order_while_the_kernel_is_full(
    ids: LocalIdentityProvider,
) -> None:
    cs, ss = await connected(ids)
    cs.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sent: list[bytes] = []
    with trio.fail_after(10):
        while not cs.unsent:  # nobody reads: the kernel fills, ciphertext waits in the stream
            chunk = os.urandom(16 * 1024)
            assert cs.try_send(chunk) == len(chunk)
            sent.append(chunk)
            await trio.lowlevel.checkpoint()
    late = b"must come after every earlier byte"
    assert cs.try_send(late) == 0  # not taken: it would overtake the waiting ciphertext
    expected = b"".join(sent) + late

    async def reader() -> None:
        assert await read_all(ss) == expected

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await cs.send_all_nowait(memoryview(b""))  # flushes what waits
            assert not cs.unsent
            await cs.send_all_nowait(memoryview(late))
            await cs.send_eof()
    await cs.aclose()
    await ss.aclose()
