"""One HBONE connection: the `h2` state machine driven by trio over a `TlsStream`, and its streams.

`HboneConnection.run()` owns the TLS connection: a reader (decrypts every ready record into one
buffer and feeds `h2`), a writer (the only task that writes the socket, so a stream whose task
is cancelled can never leave half a TLS record behind) and a keepalive (a PING after
`ping_interval` without a frame from the peer; no answer within `ping_timeout` means the peer is
gone without a FIN, e.g. a pod IP reused by another pod, and the connection fails rather than
holding streams that would only time out). `HboneStream` is one CONNECT stream as a trio
half-closeable stream: `send_eof` is END_STREAM, EOF from the peer is its END_STREAM, `reset`
is RST_STREAM, and flow control follows the windows of `hbone.py`.

Bulk cost is per frame, not per byte: frames are up to 1 MiB, the reader hands `h2` up to 256 KiB
of TLS plaintext per call, and DATA payloads are passed on as the `bytes` h2 made of them.

Why one module of ~650 lines: the connection, its reader, its single writer and its streams share
one `h2` state machine and the invariants around it (who may write the socket, when a window
opens); split across files they would still be one unit, read less easily.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import trio

from nodeagent.tunnel import hbone
from nodeagent.tunnel.credentials import TunnelCredentials
from nodeagent.tunnel.errors import STREAM_REFUSED, TunnelError
from nodeagent.tunnel.h2base import H2Driver, new_h2
from nodeagent.tunnel.tls import WANT_READ, TlsStream

# h2's frame buffer re-slices its bytearray per frame, so a read much larger than a few frames
# costs copies; 256 KiB keeps that small while still taking many TLS records per call.
READ_BUFFER = 256 * 1024
PING_INTERVAL = 10.0  # without a frame from the peer, ask with a PING
PING_TIMEOUT = 5.0  # no answer: the peer is gone
RESPONSE_TIMEOUT = 10.0  # a CONNECT's status
SEND_WAIT = 256 * 1024  # a send at least this large waits until the socket took it (back-pressure)
_ids = itertools.count(1)

StreamHandler = Callable[["HboneStream"], Awaitable[None]]


def _data_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# h2 formats every received frame for its trace log before the (no-op) logger drops it, and a
# DATA frame's repr hexlifies its whole payload: a third of the bulk path's CPU went there with
# 1 MiB frames. A DATA frame's body is shown by its size instead.
hyperframe.frame.DataFrame._body_repr = _data_body_repr  # type: ignore[method-assign,assignment]


class HboneConnection(H2Driver["HboneStream"]):
    """An established TLS connection speaking HTTP/2 (client or server side)."""

    def __init__(
        self,
        tls: TlsStream,
        *,
        client: bool,
        peer_identity: str,
        peer_certificate: bytes,
        peer_not_after: float | None = None,
        context: Any = None,
        credentials: TunnelCredentials | None = None,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        h2conn = new_h2(
            client=client,
            settings=hbone.settings(client=client),
            max_frame=hbone.MAX_FRAME,
            connection_window=hbone.CONNECTION_WINDOW,
        )
        super().__init__(h2conn, client=client)
        self.id = next(_ids)
        self.tls = tls
        self.peer_identity = peer_identity
        self.peer_certificate = peer_certificate
        # Unix time after which the peer's certificate is no longer valid (the HTTP pool bounds
        # connection lifetime by it); None when unknown.
        self.peer_not_after = peer_not_after
        self.context = context  # the TLS context that made it (a rotation retires the connection)
        # Client side: whether the certificates still allow new streams (the tunnel pool and
        # the HTTP pool above it ask before each reuse).
        self.credentials = credentials
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.last_received = trio.current_time()
        self._writer_busy = False  # the writer is inside a send (an inline flush must not write)
        self._pending_out: bytes | None = None  # bytes OpenSSL must be given again first
        self._queued = 0  # sequence of bytes handed to h2 by senders
        self._written = 0  # how far the writer got
        self._written_lot = trio.lowlevel.ParkingLot()
        self._pings: dict[bytes, trio.Event] = {}

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    # -- running (H2Driver.run) --------------------------------------------------------------

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._keepalive)

    def _ended(self) -> None:
        for event in self._pings.values():
            event.set()

    async def _close_transport(self) -> None:
        await self.tls.aclose()

    def drain(self) -> None:
        """A graceful GOAWAY now (the agent drains): the peer opens its next streams on another
        connection, those under way finish, then the connection closes. Never blocks."""
        if self.goaway or not self.alive or self.h2.closed:
            return
        self.goaway = True
        self.h2.announce_goaway()
        self.kick()  # the writer sends it, and closes once no stream is left

    async def close(self, flush_limit: float = 1.0) -> None:
        """GOAWAY, flushed (bounded), then close."""
        self.goaway = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        seq = self._queued = self._queued + 1
        self.kick()
        with trio.move_on_after(flush_limit):
            await self._wait_written(seq)
        self.fail("closed")

    async def _wait_written(self, seq: int) -> None:
        while self._written < seq and self.alive:
            await self._written_lot.park()

    def flush(self) -> None:
        """Write what h2 has queued now, without waiting, when the socket takes it; otherwise
        (or while the writer is busy) leave it to the writer. Saves a task switch per message:
        a 64-byte round trip through two agents cost four more of them without it."""
        if self._writer_busy or self._pending_out is not None or not self.alive:
            self.kick()
            return
        data = self.h2.data_to_send()
        if not data:
            return
        try:
            sent = self.tls.try_send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.fail(f"send: {exc}")
            return
        if not sent or self.tls.unsent:
            # Not taken (ciphertext of an earlier send still waits: the writer sends that and
            # then these bytes), or encrypted but not all in the kernel yet: the writer's job.
            if not sent:
                self._pending_out = data
            self.kick()
            return
        self._written = self._queued

    async def _writer(self) -> None:
        send = self.tls.send_all_nowait
        try:
            while True:
                seq = self._queued
                data = self._pending_out
                self._pending_out = None
                if data is None:
                    data = self.h2.data_to_send()
                if data or self.tls.unsent:  # an empty send flushes the TLS stream's ciphertext
                    self._writer_busy = True
                    try:
                        await send(memoryview(data))
                    finally:
                        self._writer_busy = False
                    continue
                self._written = seq
                self._written_lot.unpark_all()
                if self.goaway and not self.streams:
                    await self._finish(send)
                    return
                await self._kick_event.wait()
                self._kick_event = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.fail(f"send: {exc}")

    async def _finish(self, send: Callable[[memoryview], Awaitable[None]]) -> None:
        """GOAWAY either way and no stream left: the final GOAWAY (bounded), then close."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        data = self.h2.data_to_send()
        if data or self.tls.unsent:
            with trio.move_on_after(1):
                await send(memoryview(data))
        self.fail("closed")

    async def _reader(self) -> None:
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        tls = self.tls
        while True:
            try:
                n = tls.try_receive_into(view)
            except trio.BrokenResourceError as exc:
                self.error = self.error or f"receive: {exc}"
                return
            if n == WANT_READ:
                await trio.lowlevel.wait_readable(tls.socket)
                continue
            if n == 0:
                self.error = self.error or "peer closed the connection"
                return
            self.last_received = trio.current_time()
            try:
                events = self.h2.receive_data(view[:n])  # h2 copies it into its buffer at once
            except h2.exceptions.ProtocolError as exc:
                self.error = f"http/2 protocol error: {exc}"
                self.kick()  # h2 queued a GOAWAY
                with trio.move_on_after(1):
                    await self._wait_written(self._queued)
                return
            if self._dispatch(events):
                self.flush()
            elif tls.unsent:  # the read made OpenSSL answer (a KeyUpdate) and the kernel was full
                self.kick()
            if tls.drained:
                # The read stopped on WANT_READ (OpenSSL holds nothing either): wait for the
                # socket rather than fail one more recv first.
                await trio.lowlevel.wait_readable(tls.socket)
            else:
                await trio.lowlevel.checkpoint()

    def _dispatch(self, events: list[h2.events.Event]) -> bool:
        """Hand events to their streams; True when h2 may have something to send."""
        wake = False
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    # A stream we closed: give the connection window back.
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    wake = True
                    continue
                stream._data(event.data or b"", event.flow_controlled_length)
                continue
            wake = True
            if isinstance(event, h2.events.StreamEnded):
                if (stream := self.streams.get(event.stream_id)) is not None:
                    stream._end()
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.ResponseReceived):
                if (stream := self.streams.get(event.stream_id)) is not None:
                    stream._response(event.headers or [])
            elif isinstance(event, h2.events.StreamReset):
                if (stream := self.streams.get(event.stream_id)) is not None:
                    code = h2.errors._error_code_from_int(event.error_code or 0)
                    stream.refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
                    stream._fail(f"stream reset by peer ({code!s})")
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id == 0:
                    for stream in self.streams.values():
                        stream._wake_send()
                elif (stream := self.streams.get(event.stream_id)) is not None:
                    stream._wake_send()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                for stream in self.streams.values():
                    stream._wake_send()
            elif isinstance(event, h2.events.PingAckReceived):
                waiter = self._pings.pop(bytes(event.ping_data or b""), None)
                if waiter is not None:
                    waiter.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True
                last = event.last_stream_id or 0
                for sid, stream in list(self.streams.items()):
                    if sid > last:
                        stream.refused = True
                        stream._fail("refused by GOAWAY")
                self.kick()  # the writer closes the connection once no stream is left
        return wake

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        assert sid is not None
        if self._handler is None or self._handlers is None or self.client or self.goaway:
            # Nobody serves it; after our GOAWAY it crossed it: never processed, safe to retry.
            code = (
                h2.errors.ErrorCodes.REFUSED_STREAM if self.goaway else h2.errors.ErrorCodes.CANCEL
            )
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.reset_stream(sid, code)
            self.kick()
            return
        stream = HboneStream(self, sid)
        stream.request_headers = list(event.headers or [])
        self.streams[sid] = stream
        self.streams_opened += 1
        self._handlers.start_soon(self._handle, stream)

    async def _handle(self, stream: HboneStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep_until(self.last_received + self.ping_interval)
            if trio.current_time() < self.last_received + self.ping_interval:
                continue
            if self.h2.closed:
                return  # a GOAWAY went either way: the connection is ending, nothing to probe
            if not await self.ping(self.ping_timeout):
                self.fail(f"no PING answer within {self.ping_timeout:g}s (peer gone)")
                return

    async def ping(self, limit: float) -> bool:
        """True when the peer answered a PING within `limit` seconds (it is there)."""
        if not self.alive or self.h2.closed:
            await trio.lowlevel.checkpoint()
            return False
        opaque = os.urandom(8)
        waiter = self._pings[opaque] = trio.Event()
        self.h2.ping(opaque)
        self.kick()
        with trio.move_on_after(limit):
            await waiter.wait()
        self._pings.pop(opaque, None)
        return waiter.is_set() and self.alive

    # -- the client side -------------------------------------------------------------------

    async def open_stream(
        self, request: hbone.ConnectRequest, limit: float = RESPONSE_TIMEOUT
    ) -> HboneStream:
        """Send a CONNECT and wait for its status: the stream on 200, TunnelError otherwise
        (flag `hbone.status_flag`, or `connection_failed` when the connection died first)."""
        if not self.accepts_streams():
            raise TunnelError("connection_failed", f"connection closed: {self.error or 'goaway'}")
        try:
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, hbone.connect_headers(request))
        except h2.exceptions.H2Error as exc:
            raise TunnelError("connection_failed", f"CONNECT: {exc}") from None
        stream = HboneStream(self, sid)
        self.streams[sid] = stream
        self.streams_opened += 1
        self.flush()
        try:
            with trio.move_on_after(limit) as scope:
                status = await stream._wait_response()
            if scope.cancelled_caught:
                raise TunnelError("status_timeout", f"no CONNECT status within {limit:g}s")
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        if status != hbone.OK:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise TunnelError(hbone.status_flag(status), f"refused: {status}")
        return stream


class HboneStream(trio.abc.HalfCloseableStream):
    """One CONNECT stream. Receiving and sending may run in two tasks at once."""

    def __init__(self, conn: HboneConnection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.status: int | None = None
        self.error = ""  # reset or connection failure
        self.refused = False  # never processed by the peer (above its GOAWAY, REFUSED_STREAM)
        self._chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self._offset = 0
        self._eof = False
        self._eof_sent = False
        self._closed = False
        self._read_event: trio.Event | None = None
        self._send_event: trio.Event | None = None
        self._response_event = trio.Event()
        self.on_close: list[Callable[[HboneStream], None]] = []
        # Set by a reader while it waits with nothing queued (the relay, into a socket): takes
        # arriving DATA without waiting, returns how many bytes it took (the rest is queued).
        self.sink: Callable[[bytes], int] | None = None

    # -- what the peer verified --------------------------------------------------------------

    @property
    def peer_identity(self) -> str:
        return self.conn.peer_identity

    @property
    def peer_certificate(self) -> bytes:
        return self.conn.peer_certificate

    @property
    def peer_not_after(self) -> float | None:
        return self.conn.peer_not_after

    @property
    def credentials(self) -> TunnelCredentials | None:
        """The connection's certificates (client side): the HTTP pool asks before reusing."""
        return self.conn.credentials

    # -- events from the connection's reader -------------------------------------------------

    def _data(self, data: bytes, flow: int) -> None:
        if self._closed:
            self.conn.h2.acknowledge_received_data(flow, self.id)
            return
        sink = self.sink
        if sink is not None and not self._chunks:
            # The reader of this stream is waiting and nothing is queued: hand the bytes on
            # now, in the connection reader's task (no wake-up of the stream's reader).
            taken = sink(data)
            if taken >= len(data):
                self._consumed(flow)
                return
            data = data[taken:]
        self._chunks.append((data, flow))
        if self._read_event is not None:
            self._read_event.set()

    def _end(self) -> None:
        self._eof = True
        if self._read_event is not None:
            self._read_event.set()

    def _response(self, headers: list[Any]) -> None:
        try:
            self.status = hbone.parse_status(headers)
        except hbone.HboneError as exc:
            self._fail(str(exc))
        self._response_event.set()

    def _fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        self._response_event.set()
        if self._read_event is not None:
            self._read_event.set()
        self._wake_send()

    def _wake_send(self) -> None:
        if self._send_event is not None:
            self._send_event.set()

    async def _wait_response(self) -> int:
        await self._response_event.wait()
        if self.status is None:
            flag = STREAM_REFUSED if self.refused else "connection_failed"
            raise TunnelError(flag, f"CONNECT: {self.error or 'no status'}")
        return self.status

    # -- the server side ------------------------------------------------------------------------

    async def respond(self, status: int) -> None:
        """The CONNECT's status; anything but 200 also ends the stream."""
        try:
            self.conn.h2.send_headers(
                self.id, hbone.response_headers(status), end_stream=status != hbone.OK
            )
        except h2.exceptions.H2Error as exc:
            raise trio.BrokenResourceError(f"respond {status}: {exc}") from None
        if status != hbone.OK:
            self._eof_sent = True
        self.status = status
        self.conn.flush()
        await trio.lowlevel.checkpoint()

    # -- the stream ------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        waited = False
        while not self._chunks:
            if self.error:
                raise trio.BrokenResourceError(self.error)
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            self._read_event = trio.Event()
            await self._read_event.wait()
            self._read_event = None
            waited = True
        data, flow = self._chunks[0]
        size = max_bytes or len(data)
        start = self._offset
        if start == 0 and len(data) <= size:
            piece = data
            self._chunks.popleft()
            self._consumed(flow)
        else:
            piece = data[start : start + size]
            self._offset += len(piece)
            if self._offset >= len(data):
                self._chunks.popleft()
                self._offset = 0
                self._consumed(flow)
        if not waited:
            await trio.lowlevel.checkpoint()
        return piece

    # -- the relay's primitives: no checkpoint unless they have to wait ------------------------

    def try_receive_into(self, view: memoryview) -> int:
        """Copy what has arrived into `view` without waiting: the byte count, 0 at EOF, or
        WANT_READ when nothing is there yet (then `wait_readable`)."""
        total = 0
        size = len(view)
        chunks = self._chunks
        while chunks and total < size:
            data, flow = chunks[0]
            start = self._offset
            take = min(len(data) - start, size - total)
            view[total : total + take] = data[start : start + take]
            total += take
            if start + take >= len(data):
                chunks.popleft()
                self._offset = 0
                self._consumed(flow)
            else:
                self._offset = start + take
        if total:
            return total
        if self.error:
            raise trio.BrokenResourceError(self.error)
        if self._eof:
            return 0
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        return WANT_READ

    @property
    def drained(self) -> bool:
        """Nothing left to read right now (the next read would wait)."""
        return not self._chunks

    async def wait_readable(self) -> None:
        if self._chunks or self._eof or self.error or self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._read_event = trio.Event()
        try:
            await self._read_event.wait()
        finally:
            self._read_event = None

    def _consumed(self, flow: int) -> None:
        if not self.error:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.h2.acknowledge_received_data(flow, self.id)
            self.conn.flush()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all_nowait(memoryview(data))
        await trio.lowlevel.checkpoint()

    async def send_all_nowait(self, view: memoryview) -> None:
        """`send_all` without the trailing checkpoint (the relay checkpoints by itself): waits
        only for flow-control window, or for the socket to take a large send."""
        if self._eof_sent or self._closed:
            raise trio.ClosedResourceError("send after send_eof or close")
        h2c = self.conn.h2
        total = len(view)
        while view:
            if self.error:
                raise trio.BrokenResourceError(self.error)
            try:
                window = min(h2c.local_flow_control_window(self.id), h2c.max_outbound_frame_size)
            except h2.exceptions.H2Error as exc:
                raise trio.BrokenResourceError(f"send: {exc}") from None
            if window <= 0:
                self._send_event = trio.Event()
                await self._send_event.wait()
                self._send_event = None
                continue
            n = min(window, len(view))
            try:
                h2c.send_data(self.id, bytes(view[:n]))
            except h2.exceptions.H2Error as exc:
                raise trio.BrokenResourceError(f"send: {exc}") from None
            view = view[n:]
        conn = self.conn
        conn._queued += 1
        seq = conn._queued
        conn.flush()
        if total >= SEND_WAIT:
            await conn._wait_written(seq)
            if not conn.alive:
                raise trio.BrokenResourceError(conn.error or "connection closed")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._eof_sent = True
        if not self.error:
            try:
                self.conn.h2.end_stream(self.id)
            except h2.exceptions.H2Error as exc:
                raise trio.BrokenResourceError(f"send_eof: {exc}") from None
            self.conn.flush()
        await trio.lowlevel.checkpoint()

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """RST_STREAM now (never blocks): the peer's side of the stream fails at once."""
        if not self.error:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.h2.reset_stream(self.id, code)
            self.conn.kick()
        self._fail("stream reset")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if not (self._eof and self._eof_sent) and not self.error:
                # Closed before both sides ended: tell the peer so it does not wait.
                self.reset()
            # Give back the window of what was received and never read.
            unread = sum(flow for _, flow in self._chunks)
            self._chunks.clear()
            if unread:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.conn.h2.acknowledge_received_data(unread, self.id)
                self.conn.kick()
            self.conn.streams.pop(self.id, None)
            if self.conn.goaway and not self.conn.streams:
                self.conn.kick()  # the writer closes the connection
            for callback in self.on_close:
                callback(self)
        await trio.lowlevel.checkpoint()
