"""The HTTP proxy's socket I/O: `receive_some`/`send_all` without trio's per-call scheduler yields.

trio's `SocketStream.receive_some`/`send_all` yield to the scheduler at least once per call (two
for a plain `send_all`), even when the kernel could take or give the bytes at once; the proxy
makes four such calls per request (client read, upstream write, upstream read, client write), so
at the maximum rate a good part of the client agent's CPU went into scheduler round trips (the
same finding as the L4 relay's, docs/dataplane.md "Performance"). `FastIO` drives a
`trio.SocketStream` through its file descriptor and a tunnel `TlsStream` through its no-checkpoint
primitives: an operation that can complete now does so, it waits only on EAGAIN / WANT_READ /
WANT_WRITE (the cancellation point), and it checkpoints every `YIELD_EVERY` operations that did not
wait, so a connection that always has bytes ready cannot starve the others. Any other stream
(in-memory test streams, wrappers) goes through its own methods. Errors are trio's: a failed
socket raises `trio.BrokenResourceError`, as the stream itself would.
"""

from __future__ import annotations

import os

import trio

from nodeagent.tunnel.tls import TlsStream

YIELD_EVERY = 16


class FastIO:
    """`receive_some`/`send_all` for one stream; the stream stays the owner (close it, not this)."""

    __slots__ = ("_drained", "_kind", "_ready", "_sock", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._ready = 0  # operations completed without waiting since the last checkpoint
        self._drained = False  # the last read was short: the socket is most likely empty
        if type(stream) is trio.SocketStream:
            self._kind = 1
            self._sock = stream.socket
        elif isinstance(stream, TlsStream):
            self._kind = 2
        else:
            self._kind = 0

    async def _fair(self) -> None:
        self._ready += 1
        if self._ready >= YIELD_EVERY:
            self._ready = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int) -> bytes:
        kind = self._kind
        if kind == 0:
            return bytes(await self.stream.receive_some(max_bytes))
        if kind == 2:
            assert isinstance(self.stream, TlsStream)
            data = await self.stream.receive_some(max_bytes)  # waits only on WANT_READ/WRITE
            await self._fair()
            return data
        if self._drained:
            # A short read emptied the socket: waiting first saves a failing recv per message.
            self._drained = False
            self._ready = 0
            await self._wait_readable()
        while True:
            try:
                data = os.read(self._fileno(), max_bytes)
            except BlockingIOError:
                self._ready = 0
                await self._wait_readable()
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive: {exc}") from exc
            self._drained = 0 < len(data) < max_bytes
            await self._fair()
            return data

    def _fileno(self) -> int:
        # Looked up per call, never cached: a closed socket's number may belong to another.
        fd: int = self._sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return fd

    async def _wait_readable(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self._sock)
        except OSError as exc:  # closed meanwhile
            raise trio.ClosedResourceError(f"receive: {exc}") from exc

    async def send_all(self, data: bytes) -> None:
        kind = self._kind
        if kind == 0:
            await self.stream.send_all(data)
            return
        if kind == 2:
            assert isinstance(self.stream, TlsStream)
            await self.stream.send_all_nowait(memoryview(data))
            await self._fair()
            return
        view = memoryview(data)
        fd = self._fileno()
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                self._ready = 0
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except OSError as exc:
                    raise trio.ClosedResourceError(f"send: {exc}") from exc
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"send: {exc}") from exc
            view = view[sent:]
        await self._fair()
