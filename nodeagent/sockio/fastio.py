"""`FastIO`: `receive_some`/`send_all` for one stream over its fast end (`ends.py`)."""

from __future__ import annotations

import trio

from nodeagent.sockio.ends import WANT_READ, YIELD_EVERY, HboneEnd, end_of


class FastIO:
    """`receive_some`/`send_all` for one stream; the stream stays the owner (close it, not this)."""

    __slots__ = ("_drained", "_end", "_ready", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._end = end_of(stream)
        self._ready = 0  # operations completed without waiting since the last checkpoint
        self._drained = False  # the last read was short: the socket is most likely empty

    async def _fair(self) -> None:
        self._ready += 1
        if self._ready >= YIELD_EVERY:
            self._ready = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int) -> bytes:
        end = self._end
        if end is None:
            return bytes(await self.stream.receive_some(max_bytes))
        # The fairness checkpoint comes before the read, never after: a cancellation there
        # (a watch on an idle client being called off) would drop the bytes just read.
        self._ready += 1
        if self._ready >= YIELD_EVERY:
            self._ready = 0
            await trio.lowlevel.checkpoint()
        if isinstance(end, HboneEnd):
            return await end.stream.receive_some(max_bytes)  # waits only for a frame
        if self._drained:
            # A short read emptied the socket: waiting first saves a failing recv per message.
            self._drained = False
            self._ready = 0
            await end.wait(WANT_READ)
        while True:
            got = end.try_read_bytes(max_bytes)
            if got is None:
                self._ready = 0
                await end.wait(WANT_READ)
                continue
            self._drained = 0 < len(got) < max_bytes
            return got

    async def send_all(self, data: bytes) -> None:
        end = self._end
        if end is None:
            await self.stream.send_all(data)
            return
        await end.write(memoryview(data))
        await self._fair()
