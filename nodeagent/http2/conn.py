"""One HTTP/2 connection in the clear (h2c, prior knowledge) over any trio stream: the `h2`
state machine (sans-IO) driven by a reader and a single writer, as `tunnel/h2conn.py` drives
HBONE (what both share: `tunnel/h2base.py`), but for requests and responses rather than CONNECT
tunnels, and over a plain stream (the client's socket, or an HBONE stream to the destination
pod).

`H2Connection.run(handler)` serves the connection: the reader feeds `h2` and hands events to
their `H2Stream`; the writer is the only task that writes the transport (a cancelled sender can
never leave half a frame behind). Flow control is end to end: received DATA is acknowledged
(the window given back to the peer) only when the stream's reader takes it, and `send_data`
waits for the peer's window, so a proxy that reads one side and writes the other moves bytes at
the pace of the slower peer, holding at most a window's worth per stream.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from nodeagent.tunnel.h2base import H2Driver, new_h2

Headers = list[tuple[bytes, bytes]]

READ_SIZE = 256 * 1024
STREAM_WINDOW = 1024 * 1024  # what one stream may have in flight towards us
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 64 * 1024
MAX_HEADER_LIST = 64 * 1024  # as the HTTP/1.1 proxy's max_header_bytes (60 KiB) and a bit
DEFAULT_MAX_STREAMS = 1000  # concurrent streams we accept (server side)
_ids = itertools.count(1)


class StreamReset(Exception):
    """The stream ended abnormally: reset by the peer (`refused`: REFUSED_STREAM or above the
    peer's GOAWAY, so never processed and safe to retry), or the connection failed."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


class H2Connection(H2Driver["H2Stream"]):
    """An HTTP/2 connection, client or server side, over `transport`."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client: bool,
        max_concurrent_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        settings = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        h2conn = new_h2(
            client=client,
            settings=settings,
            max_frame=MAX_FRAME,
            connection_window=CONNECTION_WINDOW,
        )
        super().__init__(h2conn, client=client)
        self.id = next(_ids)
        self.transport = transport
        self.last_active = trio.current_time()
        self.streams_changed_at = self.last_active  # a stream opened or closed (idle timeout)
        self.on_stream_end: Callable[[], None] | None = None  # the pool's pending queue

    def capacity(self) -> int:
        """How many more streams the peer lets us open now."""
        limit = self.h2.remote_settings.max_concurrent_streams
        return max(0, limit - len(self.streams))

    async def _close_transport(self) -> None:
        await self.transport.aclose()

    def close(self) -> None:
        """No new streams; once the streams under way ended, the final GOAWAY and the
        connection ends."""
        self.goaway = True
        self.kick()

    def drain(self) -> None:
        """`close`, telling the peer now (server side, the agent drains): a graceful GOAWAY, so
        the client opens its next streams on a new connection (to the agent taking over) while
        those under way here finish."""
        if not self.client and not self.goaway and self.alive and not self.h2.closed:
            self.h2.announce_goaway()
        self.close()

    async def _writer(self) -> None:
        try:
            while True:
                data = self.h2.data_to_send()
                if data:
                    await self.transport.send_all(data)
                    continue
                if self.goaway and not self.streams:
                    # GOAWAY either way and nothing left to answer: say so, then close.
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        self.h2.close_connection()
                    if data := self.h2.data_to_send():
                        with trio.move_on_after(1):
                            await self.transport.send_all(data)
                    self.fail("closed")
                    return
                await self._kick_event.wait()
                self._kick_event = trio.Event()
                # Let the tasks that just woke us finish their turn first: a head, its DATA
                # and its trailers written in one scheduling round go out in one write.
                await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(f"send: {exc}")

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.transport.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.error = self.error or f"receive: {exc}"
                return
            if not data:
                self.error = self.error or "peer closed the connection"
                return
            self.last_active = trio.current_time()
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self.error = f"http/2 protocol error: {exc}"
                self.kick()  # h2 queued a GOAWAY
                with trio.move_on_after(1):
                    await self.transport.send_all(self.h2.data_to_send())
                return
            self._dispatch(events)
            self.kick()

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        for event in events:
            sid = getattr(event, "stream_id", None)
            stream = self.streams.get(sid) if sid else None
            if isinstance(event, h2.events.DataReceived):
                if stream is None:
                    # A stream we closed: give the connection window back.
                    with contextlib.suppress(h2.exceptions.H2Error):
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    continue
                stream._data(event.data or b"", event.flow_controlled_length)
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event)  # END_STREAM on the head comes as StreamEnded too
            elif isinstance(event, h2.events.ResponseReceived):
                if stream is not None:
                    stream._headers(list(event.headers or []))
            elif isinstance(event, h2.events.TrailersReceived):
                if stream is not None:
                    stream.trailers = list(event.headers or [])
            elif isinstance(event, h2.events.StreamEnded):
                if stream is not None:
                    stream._end()
            elif isinstance(event, h2.events.StreamReset):
                if stream is not None:
                    code = event.error_code or 0
                    refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
                    stream._fail(f"stream reset by peer ({code!s})", refused=refused)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                targets = self.streams.values() if not sid else [stream] if stream else []
                for s in list(targets):
                    s._wake_send()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True  # the writer closes the connection once no stream is left
                last = event.last_stream_id or 0
                for other_sid, other in list(self.streams.items()):
                    if self.client and other_sid > last:
                        other._fail("refused by GOAWAY", refused=True)

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        assert sid is not None
        stream = H2Stream(self, sid)
        stream._headers(list(event.headers or []))
        self.streams[sid] = stream
        self.streams_opened += 1
        self.streams_changed_at = trio.current_time()
        if self._handler is None or self._handlers is None or self.client or self.goaway:
            # Never processed (after our GOAWAY it crossed it): the client may retry it.
            stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
            stream.close()
            return
        self._handlers.start_soon(self._handle, stream)

    async def _handle(self, stream: H2Stream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream)
        finally:
            stream.close()

    # -- the client side -------------------------------------------------------------------

    def open_stream(self, headers: Headers, *, end_stream: bool = False) -> H2Stream:
        """Send a request head on a new stream (StreamReset(refused) when the connection takes
        no more streams)."""
        if not self.accepts_streams():
            raise StreamReset(f"connection closed: {self.error or 'goaway'}", refused=True)
        try:
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, headers, end_stream=end_stream)
        except h2.exceptions.H2Error as exc:
            raise StreamReset(f"open stream: {exc}", refused=True) from None
        stream = H2Stream(self, sid)
        stream._eof_sent = end_stream
        self.streams[sid] = stream
        self.streams_opened += 1
        self.last_active = trio.current_time()
        self.kick()
        return stream


async def close_when_idle(conn: H2Connection, idle: float) -> None:
    """A connection without a stream for `idle` seconds gets a GOAWAY and closes (as
    HTTP/1.1's keep-alive close; a gRPC channel reconnects when it needs to)."""
    while conn.alive:
        await trio.sleep_until(conn.streams_changed_at + idle)
        if not conn.streams and trio.current_time() >= conn.streams_changed_at + idle:
            conn.close()
            return


class H2Stream:
    """One request/response exchange. The head, the DATA and the trailers of the peer's side
    arrive in order (`wait_headers`, `receive_data` → b"" at the end, then `trailers`); our side
    is sent with `send_headers`, `send_data`, `send_trailers` / `end`."""

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers: Headers | None = None  # the request head (server) / response head (client)
        self.trailers: Headers | None = None
        self.error = ""
        self.refused = False
        self.received_bytes = 0
        self.sent_bytes = 0
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._eof = False
        self._eof_sent = False
        self._closed = False
        self._event = trio.Event()  # something arrived (headers, data, end, error)
        self._send_event: trio.Event | None = None
        self.on_fail: Callable[[], None] | None = None
        self.on_activity: Callable[[], None] | None = None  # a DATA payload moved either way

    # -- from the reader ----------------------------------------------------------------------

    def _headers(self, headers: Headers) -> None:
        status = _value(headers, b":status")
        if status is not None and status.startswith(b"1"):
            return  # 100 Continue, 103 Early Hints: not passed on
        self.headers = headers
        self._event.set()

    def _data(self, data: bytes, flow: int) -> None:
        if self._closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.h2.acknowledge_received_data(flow, self.id)
            return
        self._chunks.append((data, flow))
        self._event.set()

    def _end(self) -> None:
        self._eof = True
        self._event.set()

    def _fail(self, reason: str, *, refused: bool = False) -> None:
        if not self.error:
            self.error = reason
            self.refused = refused
            if self.on_fail is not None:
                self.on_fail()
        self._event.set()
        self._wake_send()

    def _wake_send(self) -> None:
        if self._send_event is not None:
            self._send_event.set()

    async def _wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()

    # -- receiving ------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The peer's side is complete (END_STREAM) and nothing of it is left unread."""
        return self._eof and not self._chunks

    async def wait_headers(self) -> Headers:
        while self.headers is None:
            if self.error:
                raise StreamReset(self.error, refused=self.refused)
            await self._wait()
        return self.headers

    async def receive_data(self) -> bytes:
        """The next DATA payload; b"" once the peer ended the stream. Taking it gives its
        window back to the peer (flow control end to end)."""
        while not self._chunks:
            if self._eof:
                # Complete: a reset after END_STREAM (a server's RST_STREAM NO_ERROR once it
                # answered, RFC 9113 §8.1) loses nothing.
                return b""
            if self.error:
                raise StreamReset(self.error, refused=self.refused)
            await self._wait()
        data, flow = self._chunks.popleft()
        self.received_bytes += len(data)
        if self.on_activity is not None:
            self.on_activity()
        if flow and not self.error:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.h2.acknowledge_received_data(flow, self.id)
            self.conn.kick()
        return data

    # -- sending --------------------------------------------------------------------------

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        if self.error:
            raise StreamReset(self.error, refused=self.refused)
        try:
            self.conn.h2.send_headers(self.id, headers, end_stream=end_stream)
        except h2.exceptions.H2Error as exc:
            raise StreamReset(f"send headers: {exc}") from None
        self._eof_sent = self._eof_sent or end_stream
        self.conn.kick()

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send `data`, waiting for the peer's flow-control window as needed."""
        h2c = self.conn.h2
        view = memoryview(data)
        while True:
            if self.error:
                raise StreamReset(self.error, refused=self.refused)
            if not view:
                break
            try:
                window = min(h2c.local_flow_control_window(self.id), h2c.max_outbound_frame_size)
            except h2.exceptions.H2Error as exc:
                raise StreamReset(f"send: {exc}") from None
            if window <= 0:
                self._send_event = trio.Event()
                await self._send_event.wait()
                self._send_event = None
                continue
            n = min(window, len(view))
            try:
                h2c.send_data(self.id, bytes(view[:n]))
            except h2.exceptions.H2Error as exc:
                raise StreamReset(f"send: {exc}") from None
            self.sent_bytes += n
            view = view[n:]
            self.conn.kick()
            if self.on_activity is not None:
                self.on_activity()
        if end_stream:
            self.end()
        await trio.lowlevel.checkpoint()

    def send_trailers(self, trailers: Headers) -> None:
        self.send_headers(trailers, end_stream=True)

    async def finish(self, trailers: Headers | None) -> None:
        """Our side's end: the trailers (END_STREAM on them), else an empty DATA frame. Never
        blocks (async for the shape `streams.UpstreamStream` asks of every upstream codec)."""
        if trailers:
            self.send_trailers(trailers)
        else:
            self.end()

    async def aclose(self) -> None:
        """`close`; never blocks (async for the shape of `streams.UpstreamStream`)."""
        self.close()

    def end(self) -> None:
        """END_STREAM on our side (an empty DATA frame)."""
        if self._eof_sent or self.error:
            return
        self._eof_sent = True
        try:
            self.conn.h2.end_stream(self.id)
        except h2.exceptions.H2Error as exc:
            raise StreamReset(f"end stream: {exc}") from None
        self.conn.kick()

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """RST_STREAM now (never blocks); our own reset does not call `on_fail`."""
        self.on_fail = None
        if not self.error:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.h2.reset_stream(self.id, code)
            self.conn.kick()
        self._fail("stream reset")

    def close(self) -> None:
        """Done with the stream: reset it if either side is still open, give back the window of
        anything unread, forget it."""
        if self._closed:
            return
        self._closed = True
        if not (self._eof and self._eof_sent) and not self.error:
            # Our side done, theirs not (an answer before the whole request): NO_ERROR, as
            # RFC 9113 §8.1 says; otherwise we are abandoning the exchange.
            done = self._eof_sent
            self.reset(h2.errors.ErrorCodes.NO_ERROR if done else h2.errors.ErrorCodes.CANCEL)
        unread = sum(flow for _, flow in self._chunks)
        self._chunks.clear()
        if unread:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.h2.acknowledge_received_data(unread, self.id)
        self.conn.streams.pop(self.id, None)
        self.conn.last_active = self.conn.streams_changed_at = trio.current_time()
        self.conn.kick()
        if self.conn.on_stream_end is not None:
            self.conn.on_stream_end()


def _value(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None
