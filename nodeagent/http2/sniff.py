"""What a client speaks, from its first bytes: the HTTP/2 connection preface, an HTTP/1.x request
line, or something else. `classify` is pure; `sniff` peeks at a socket (MSG_PEEK: the bytes stay
for whoever serves the connection), bounded in time so that a server-first protocol (the client
waits for the server to speak: MySQL, SMTP) is not stalled: no byte within the timeout → TCP.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Literal

import trio

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Sniffed = Literal["h2", "http1", "tcp"]
# An HTTP/1.x request line's start: a token method, a space (RFC 9112 §3). The rest of the
# line decides nothing here: the HTTP/1.1 proxy's framing checks it.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,20} ")
_MAX_METHOD = 21
SNIFF_BYTES = len(PREFACE)


def classify(data: bytes) -> Sniffed | None:
    """The protocol `data` (the first bytes of a connection) starts, None while undecided."""
    if PREFACE.startswith(data[: len(PREFACE)]):
        return "h2" if len(data) >= len(PREFACE) else None
    if data.startswith(b"PRI * HTTP/2.0"):
        return "tcp"  # a broken preface is nothing we can proxy as HTTP
    if _METHOD.match(data):
        return "http1"
    head = data[:_MAX_METHOD]
    if len(data) < _MAX_METHOD and re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*", head):
        return None  # still a method token so far
    return "tcp"


def classify_declared(data: bytes) -> Sniffed | None:
    """On a port declared HTTP or HTTP/2: h2 (prior knowledge) or else HTTP/1.1, decided by
    the first byte that differs from the preface (the first byte of any method but P…), so a
    client trickling its request line is never held here."""
    n = min(len(data), len(PREFACE))
    if data[:n] != PREFACE[:n]:
        return "http1"
    return "h2" if len(data) >= len(PREFACE) else None


async def sniff(
    sock: trio.socket.SocketType,
    within: float,
    classifier: Callable[[bytes], Sniffed | None] = classify,
) -> Sniffed:
    """Peek until the first bytes decide (`classifier`), the client closes, or `within`
    seconds pass (→ tcp)."""
    with trio.move_on_after(within):
        while True:
            try:
                data = await sock.recv(SNIFF_BYTES, socket.MSG_PEEK)
            except OSError:
                return "tcp"
            if not data:
                return "tcp"
            got = classifier(data)
            if got is not None:
                return got
            # Undecided on a short read: wait for more than what is queued already.
            await trio.sleep(0.001)
    return "tcp"


class Replayed(trio.abc.HalfCloseableStream):
    """`inner` with `first` (bytes already read off it) given back before what follows."""

    def __init__(self, first: bytes, inner: trio.abc.Stream) -> None:
        self._first = first
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            n = len(self._first) if max_bytes is None else max_bytes
            data, self._first = self._first[:n], self._first[n:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def sniff_stream(stream: trio.abc.Stream, within: float) -> tuple[Sniffed, Replayed]:
    """`sniff` for a stream that cannot be peeked at (an HBONE stream): read until the first
    bytes decide, the peer closes or `within` passes (→ tcp), and hand back the stream with
    those bytes to be read again."""
    data = b""
    got: Sniffed | None = None
    with trio.move_on_after(within):
        while got is None:
            try:
                chunk = await stream.receive_some(SNIFF_BYTES - len(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            if not chunk:
                break
            data += chunk
            got = classify(data)
    return got or "tcp", Replayed(data, stream)
