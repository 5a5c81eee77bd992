"""The byte mover under `protocol`: frames (and their descriptors) over one AF_UNIX stream socket.

`send` writes a frame whole under a lock (several tasks send on one channel), the descriptors
attached to its first byte with SCM_RIGHTS; `receive` returns the next `Message`. A closed or
reset peer ends `receive` with `ChannelClosed`.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from typing import Any

import trio

from nodeagent.workers.protocol import FrameDecoder, Message, encode

READ_SIZE = 256 * 1024
MAX_FDS_PER_READ = 64


class ChannelClosed(Exception):
    """The other process closed its end (or died)."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._decoder = FrameDecoder()
        self._send_lock = trio.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    async def send(self, body: dict[str, Any], fds: Sequence[int] = ()) -> None:
        frame = encode(body, fds=len(fds))
        async with self._send_lock:
            try:
                view = memoryview(frame)
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = await self._sock.sendmsg([view], anc)
                    view = view[sent:]
                while view:
                    sent = await self._sock.send(view)
                    view = view[sent:]
            except OSError as exc:
                raise ChannelClosed(f"send: {exc.strerror or exc}") from None

    async def receive(self) -> Message:
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                return msg
            fd_size = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array("i").itemsize)
            try:
                data, anc, _flags, _ = await self._sock.recvmsg(
                    READ_SIZE, fd_size, socket.MSG_CMSG_CLOEXEC
                )
            except OSError as exc:
                raise ChannelClosed(f"receive: {exc.strerror or exc}") from None
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
                    fds.extend(arr)
            if not data:
                for fd in fds + self._decoder.pending_fds():
                    os.close(fd)
                raise ChannelClosed("the peer closed the channel")
            self._decoder.receive_data(data, fds)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
            for fd in self._decoder.pending_fds():
                os.close(fd)
