"""The two stream kinds the agent moves bytes on, driven without scheduler round trips.

An end offers a non-blocking read (`try_read(view)` → bytes read, 0 at EOF, or `WANT_READ` /
`WANT_WRITE` when it must wait), `wait(want)`, an async `write(view)` that waits only when the
kernel (or TLS) cannot take more, and `send_eof`. Failures are trio's: a failed socket raises
`trio.BrokenResourceError`, a closed one `trio.ClosedResourceError`, as the stream itself would.
"""

from __future__ import annotations

import os

import trio

from nodeagent.tunnel.h2conn import HboneStream
from nodeagent.tunnel.tls import WANT_READ

WANT_WRITE = -2  # `wait(WANT_WRITE)`: until the socket takes more
YIELD_EVERY = 16  # operations completed without waiting before a mover lets other tasks run

__all__ = ["WANT_READ", "WANT_WRITE", "YIELD_EVERY", "End", "HboneEnd", "SockEnd", "end_of"]


class SockEnd:
    """A `trio.SocketStream` driven through its file descriptor (non-blocking already)."""

    __slots__ = ("sock", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket

    def fileno(self) -> int:
        # Looked up per call, never cached: a closed socket's number may belong to another.
        fd: int = self.sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return fd

    def try_read(self, view: memoryview) -> int:
        try:
            return os.readv(self.fileno(), (view,))
        except BlockingIOError:
            return WANT_READ
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive: {exc}") from exc

    def try_read_bytes(self, max_bytes: int) -> bytes | None:
        """Up to `max_bytes` as a new `bytes` (b"" at EOF), None when nothing is ready."""
        try:
            return os.read(self.fileno(), max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive: {exc}") from exc

    def drained(self, n: int, size: int) -> bool:
        # A short read emptied the socket buffer (almost always): waiting first saves the
        # failing recv (a syscall and an exception) on every small message.
        return n < size

    async def wait(self, want: int) -> None:
        try:
            if want == WANT_WRITE:
                await trio.lowlevel.wait_writable(self.sock)
            else:
                await trio.lowlevel.wait_readable(self.sock)
        except OSError as exc:  # closed meanwhile
            raise trio.ClosedResourceError(f"wait: {exc}") from exc

    def try_write(self, data: bytes) -> int:
        """Write what the kernel takes now: the byte count, 0 when it takes nothing, the socket
        is closed or failed (the caller's next `write` meets the error)."""
        fd = self.sock.fileno()
        if fd < 0:
            return 0
        try:
            return os.write(fd, data)
        except OSError:
            return 0

    async def write(self, view: memoryview) -> None:
        fd = self.fileno()
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await self.wait(WANT_WRITE)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"send: {exc}") from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        await self.stream.send_eof()


class HboneEnd:
    """A tunnel `HboneStream` (one HTTP/2 CONNECT stream): reads copy the DATA frames that
    arrived, writes become DATA frames."""

    __slots__ = ("stream",)

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream

    def try_read(self, view: memoryview) -> int:
        return self.stream.try_receive_into(view)

    def drained(self, n: int, size: int) -> bool:
        return self.stream.drained

    async def wait(self, want: int) -> None:
        # Reading waits for frames; writing waits inside `write` (flow control, the socket).
        await self.stream.wait_readable()

    async def write(self, view: memoryview) -> None:
        await self.stream.send_all_nowait(view)

    async def send_eof(self) -> None:
        await self.stream.send_eof()


End = SockEnd | HboneEnd


def end_of(stream: trio.abc.Stream) -> End | None:
    """The fast end for `stream`, None for any other stream type (tests, wrappers): those go
    through the stream's own methods."""
    if type(stream) is trio.SocketStream:
        return SockEnd(stream)
    if isinstance(stream, HboneStream):
        return HboneEnd(stream)
    return None
