"""What the two HTTP/2 connection drivers share: HBONE's (`tunnel/h2conn.py`, CONNECT streams
over TLS, with its own inline-flushing writer and keepalive) and `http2/conn.py`'s (requests
over any trio stream).

`H2Driver` holds the `h2` state machine (sans-IO) and the connection's life: its streams, why
it failed, whether a GOAWAY went either way, and `run`, which serves it with a reader (the
subclass's, feeding `h2`) and a single writer task (the only one that writes the transport, so
a cancelled sender never leaves half a frame behind), stream handlers in a nursery of their
own, every stream failed when the connection ends, the transport closed last.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import h2.config
import h2.settings
import trio

from nodeagent.tunnel.goaway import GracefulH2Connection


class FailableStream(Protocol):
    def _fail(self, reason: str) -> None: ...


S = TypeVar("S", bound=FailableStream)


def new_h2(
    *,
    client: bool,
    settings: dict[h2.settings.SettingCodes, int],
    max_frame: int,
    connection_window: int,
) -> GracefulH2Connection:
    """An `h2` connection with our SETTINGS and connection window, its preface queued."""
    config = h2.config.H2Configuration(
        client_side=client, header_encoding=None, validate_inbound_headers=True
    )
    conn = GracefulH2Connection(config)
    conn.local_settings = h2.settings.Settings(client=client, initial_values=settings)
    conn.initiate_connection()
    # h2 checks inbound frame sizes against the acknowledged setting, per `receive_data` call:
    # the peer's first large frame can share a read with its ACK of our SETTINGS.
    conn.max_inbound_frame_size = max_frame
    conn.increment_flow_control_window(connection_window - 65535)
    return conn


class H2Driver(Generic[S]):
    """An HTTP/2 connection's state and life (module docstring); the subclass reads and writes."""

    def __init__(self, h2conn: GracefulH2Connection, *, client: bool) -> None:
        self.h2 = h2conn
        self.client = client
        self.streams: dict[int, S] = {}
        self.error = ""  # why the connection failed, "" while it works
        self.goaway = False  # the peer (or we) said no new streams
        self.streams_opened = 0
        self._kick_event = trio.Event()
        self._closed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._handler: Callable[[S], Awaitable[None]] | None = None
        self._handlers: trio.Nursery | None = None

    @property
    def alive(self) -> bool:
        return not self.error and not self._closed.is_set()

    def accepts_streams(self) -> bool:
        return self.alive and not self.goaway

    def kick(self) -> None:
        """Wake the writer: h2 may have bytes to send."""
        self._kick_event.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def run(self, handler: Callable[[S], Awaitable[None]] | None = None) -> None:
        """Serve the connection until it fails, closes, or the caller is cancelled; `handler`
        (server side) runs once per stream the peer opens, in its own task."""
        self._handler = handler
        try:
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                try:
                    async with trio.open_nursery() as nursery:
                        self._scope = nursery.cancel_scope
                        nursery.start_soon(self._writer)
                        self._start_tasks(nursery)
                        self.kick()  # the preface and SETTINGS
                        await self._reader()
                        nursery.cancel_scope.cancel()
                finally:
                    # Streams cannot go on without the connection: their handlers end now (a
                    # handler still connecting to its app must not hold the dead socket open).
                    self._fail_streams(self.error or "connection closed")
                    handlers.cancel_scope.cancel()
        finally:
            self._closed.set()
            self._fail_streams(self.error or "connection closed")
            self._ended()
            with trio.CancelScope(shield=True):
                await self._close_transport()

    def fail(self, reason: str) -> None:
        """Abort the connection (every stream sees the error). Never blocks."""
        if not self.error:
            self.error = reason
        self._fail_streams(reason)
        if self._scope is not None:
            self._scope.cancel()
        else:
            self._closed.set()

    def _fail_streams(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream._fail(reason)

    # -- the subclass's part ----------------------------------------------------------------

    async def _reader(self) -> None:
        raise NotImplementedError

    async def _writer(self) -> None:
        raise NotImplementedError

    async def _close_transport(self) -> None:
        raise NotImplementedError

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        """More tasks of the connection's own, beside the writer (none by default)."""

    def _ended(self) -> None:
        """The connection ended (before its transport closes); nothing by default."""
