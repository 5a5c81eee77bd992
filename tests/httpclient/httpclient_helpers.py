"""Loopback servers for the client's tests: scripted answers over real TCP (and TLS)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import trio
from certs_helpers import write_pki

__all__ = ["H11Server", "Handler", "free_port", "serve", "write_pki"]

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    """Serve `handler` per connection on 127.0.0.1; the port."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class H11Server:
    """Server side of one connection: read whole requests, answer with h11 events."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)

    async def request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None when the client closed."""
        req: h11.Request | None = None
        body = bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(1 << 16))
            elif isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                assert req is not None
                return req, bytes(body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None

    async def send(self, *events: h11.Event) -> None:
        for ev in events:
            data = self.conn.send(ev)
            if data:
                await self.stream.send_all(data)

    def next_cycle(self) -> None:
        self.conn.start_next_cycle()
