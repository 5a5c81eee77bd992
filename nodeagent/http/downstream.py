"""The client side of the HTTP proxy: the h11 server codec, the request body, local answers.

`Downstream` reads events from the client: h11 over `FastIO`, every byte checked by
`framing.RequestFraming` first, so ambiguous framing is refused before h11 sees it.
`RequestBody` streams the client's body to an upstream and keeps it for a replay while it fits
`Limits.retry_buffer_bytes` (past that, the request is no longer retried); `answer_locally`
writes a response the proxy makes itself (no route, fault, error). `Expect: 100-continue` is
answered once the proxy decided to forward (Envoy's default), so a refused request never makes
the client upload.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import h11
import trio

from nodeagent.http import flags
from nodeagent.http.errors import DownstreamError, DownstreamProtocolError
from nodeagent.http.framing import RequestFraming
from nodeagent.http.h1fast import FastServer, H1Codec, NeedsH11
from nodeagent.http.headers import head_size
from nodeagent.http.limits import Limits
from nodeagent.http.log import RequestLog, RequestRecorder, entry_for
from nodeagent.http.pool import UpstreamConnection
from nodeagent.routing import HeaderOps
from nodeagent.sockio import FastIO
from nodeagent.tunnel import TlsStream

T = TypeVar("T")
REASONS = {
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
TOUCH_SLACK = 0.01  # of the stream idle timeout: how stale its deadline may get before it moves


class Drain:
    """A proxy's drain switch, shared by its client connections: once `on` (the agent drains
    for a graceful restart), every response says `connection: close` and ends its connection,
    so keep-alive clients reconnect, to the agent that took over (Envoy's drain for HTTP/1)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


class Downstream:
    """One client connection: its h11 state and how many bytes it sent.

    `idle` is the current request's stream-idle cancel scope (None between requests): every
    byte that moves for the request, either way, pushes its deadline (`touch`). `head_timer`
    is the connection's scope for the head timeouts, entered once by the proxy around its
    keep-alive loop: `read_head` moves its deadline (a scope entered per head cost a
    measurable share of the CPU per request); it fires only while a head is awaited, and
    `head_started` then says whether some of the head had arrived.
    """

    def __init__(self, stream: trio.abc.Stream, limits: Limits, drain: Drain | None = None) -> None:
        self.stream = stream
        self.limits = limits
        self.drain = drain or Drain()
        # The fast codec until a head it does not handle, then h11 for the rest (`h1fast`).
        self.conn: H1Codec = FastServer(max_head_bytes=limits.max_header_bytes)
        self.received = 0
        self.io = FastIO(stream)
        self.framing = RequestFraming(max_head_bytes=limits.max_header_bytes)
        self.idle: trio.CancelScope | None = None
        self.address = ""  # the client's "ip:port", for the access log
        # "https" when the proxy terminated TLS for this client (the gateway's HTTPS servers):
        # matches on `scheme` and x-forwarded-proto see it, as Envoy's do.
        self.scheme = "https" if isinstance(stream, TlsStream) else "http"
        self.tasks: trio.Nursery | None = None  # the connection's nursery (client watches)
        self.head_timer = trio.CancelScope()
        self.head_started = False
        self.head_began = 0.0  # when the current head was first awaited (its entry's duration)

    def touch(self) -> None:
        """Bytes moved for the current request: the stream is not idle.

        The deadline moves only once it lags by more than `TOUCH_SLACK` of the timeout: every
        move re-files the scope in trio's deadline heap, and a request moves bytes several times
        (that churn was a measurable share of the CPU per request). The timeout fires at most 1%
        early (3 s of Envoy's 300 s default)."""
        idle = self.idle
        if idle is not None:
            timeout = self.limits.stream_idle_timeout
            deadline = trio.current_time() + timeout
            if deadline - idle.deadline > timeout * TOUCH_SLACK:
                idle.deadline = deadline

    async def read_head(self) -> h11.Event | type[h11.PAUSED]:
        """The next request head (or ConnectionClosed): the first byte within
        `idle_timeout`, the whole head within `request_headers_timeout` of its first byte,
        through `head_timer` (run this inside it: a timeout cancels out to it). Raises
        `h11.RemoteProtocolError` for a malformed head."""
        limits = self.limits
        timer = self.head_timer
        self.head_began = now = trio.current_time()
        self.head_started = bool(self.conn.trailing_data[0])  # pipelined: already begun
        timer.deadline = now + (
            limits.request_headers_timeout if self.head_started else limits.idle_timeout
        )
        try:
            while True:
                event = self.buffered_event()
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
                data = await self.receive()
                if data and not self.head_started:
                    self.head_started = True
                    timer.deadline = trio.current_time() + limits.request_headers_timeout
        finally:
            timer.deadline = math.inf  # the request's own timeouts take over

    def buffered_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event from what was already received (no I/O). A head the fast codec does
        not handle moves the connection to h11 for good, fed the same bytes (`h1fast`)."""
        while True:
            try:
                return self.conn.next_event()
            except NeedsH11:
                assert isinstance(self.conn, FastServer)
                self.conn = self.conn.handover(self.limits.max_header_bytes)

    def watch_close(self, on_close: Callable[[], object]) -> trio.CancelScope:
        """Call `on_close` if the client closes (or breaks) its connection, until the returned
        scope is cancelled. The watch is a task of the connection's nursery that nobody waits
        for: calling it off costs the request path nothing (a nursery per request made every
        response wait a scheduler round, and that skewed the balancer's latencies). Cancelling
        frees the socket for the next reader at once (trio unregisters a cancelled wait then).
        A byte the client sends meanwhile (a pipelined request) goes to h11 and ends the watch
        quietly: the request it starts is read after this response."""
        scope = trio.CancelScope()
        if self.tasks is None:
            return scope  # not serving a connection (a unit test of the body alone)

        async def watch() -> None:
            with scope:
                await trio.lowlevel.checkpoint()  # called off before it ran: read nothing
                try:
                    data = await self.receive()
                except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                    data = b""
                if not data:
                    on_close()

        self.tasks.start_soon(watch)
        return scope

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event; raises `h11.RemoteProtocolError` (a `FramingError` included)."""
        while True:
            event = self.buffered_event()
            if event is h11.NEED_DATA:
                await self.receive()
                continue
            return event  # type: ignore[return-value]

    async def receive(self) -> bytes:
        """Read from the client into h11, checked by the framing rules first."""
        data = await self.io.receive_some(self.limits.read_size)
        self.take(data)
        return data

    def take(self, data: bytes) -> None:
        """Bytes read from the client (b"": it closed): counted, checked by the framing
        rules, handed to the codec (no I/O)."""
        self.received += len(data)
        self.touch()
        self.framing.feed(data)
        self.conn.receive_data(data)

    async def send(self, event: h11.Event) -> int:
        data = self.conn.send(event)
        if data:
            await self.io.send_all(data)
        return len(data or b"")

    def body_done(self) -> bool:
        """The client sent its whole request body (or had none)."""
        return self.conn.their_state is not h11.SEND_BODY

    def skip_buffered_body(self) -> None:
        """Consume the request's body events h11 already holds (a GET's EndOfMessage), no I/O."""
        while self.conn.their_state is h11.SEND_BODY:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                return  # a malformed body: the answer closes the connection
            if not isinstance(event, h11.Data):
                return


class RequestBody:
    """The client's request body: streamed to an upstream, kept for replay while it fits."""

    def __init__(self, down: Downstream, *, limit: int, expects_body: bool) -> None:
        self.down = down
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = not expects_body
        self.replayable = True
        self.sent_continue = False

    async def stream_to(self, up: UpstreamConnection, head: h11.Request) -> None:
        """Send the request head and the whole body (replay what is kept, then read the rest)
        and EndOfMessage. What is already at hand goes out in one write: the head, the kept
        chunks and the body events h11 already holds; the batch is flushed only before waiting
        for the client (a small request is a single upstream write)."""
        out = [up.encode(head)]
        out.extend(up.encode(h11.Data(data=chunk)) for chunk in self.chunks)
        conn = self.down.conn
        while not self.complete:
            if conn.they_are_waiting_for_100_continue and not self.sent_continue:
                self.sent_continue = True
                await self._down(
                    self.down.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            try:
                event = conn.next_event()
            except h11.ProtocolError as exc:
                raise DownstreamProtocolError(f"malformed request body: {exc}") from exc
            if event is h11.NEED_DATA:
                await up.write(b"".join(out))
                out.clear()
                event = await self._down(self.down.next_event())
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                if self.replayable:
                    if self.size + len(data) > self.limit:
                        self.replayable = False
                        self.chunks.clear()
                    else:
                        self.chunks.append(data)
                        self.size += len(data)
                out.append(up.encode(h11.Data(data=data)))
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                self.complete = True
            else:
                raise DownstreamError(f"unexpected {type(event).__name__} in request body")
        out.append(up.encode(h11.EndOfMessage()))
        await up.write(b"".join(out))

    @staticmethod
    async def _down(awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except h11.RemoteProtocolError as exc:
            raise DownstreamProtocolError(
                f"malformed request body: {exc}", exc.error_status_hint
            ) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            raise DownstreamError(f"client failed while sending the body: {exc}") from exc


async def answer_if_unanswered(
    down: Downstream, entry: RequestLog, status: int, body: bytes
) -> None:
    """End a request that failed before its response started (408 idle, a malformed body's
    4xx) with that answer and a close; nothing when a response is already on its way, or the
    client is gone."""
    if down.conn.our_state is h11.SEND_RESPONSE:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await answer_locally(down, entry, status, body, close=True)


async def answer_locally(
    down: Downstream,
    entry: RequestLog,
    status: int,
    body: bytes,
    *,
    close: bool = False,
    extra: Sequence[tuple[str, str]] = (),
    response_headers: HeaderOps | None = None,
) -> bool:
    """Answer with a response the proxy makes. Returns whether the connection can serve
    another request."""
    # A body the client is still sending (or waiting to send) would be read as the next
    # request: skip what is already buffered, close instead of draining the rest.
    down.skip_buffered_body()
    keep = not close and not down.drain.on and down.conn.their_state is h11.DONE
    hdrs = [("content-length", str(len(body))), *extra]
    if body:
        hdrs.append(("content-type", "text/plain"))
    if response_headers:
        hdrs = response_headers.apply(hdrs)
    if not keep:
        hdrs.append(("connection", "close"))
    try:
        data = b"".join(
            down.conn.send(ev) or b""
            for ev in (
                h11.Response(status_code=status, headers=hdrs),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )
        )
    except h11.LocalProtocolError:
        return False
    entry.code = status
    await down.io.send_all(data)
    entry.bytes_sent += len(data)
    return keep and down.conn.our_state is h11.DONE


async def read_request(
    down: Downstream, limits: Limits, recorder: RequestRecorder, conn_id: int
) -> h11.Event | type[h11.PAUSED] | None:
    """The next event of a keep-alive loop (`Downstream.read_head`): a malformed head is
    answered (400, or h11's hint) and an oversized one 431, each finished as its own request
    record, and both give None (the connection ends). Used by both proxies (source and
    destination), so every hop refuses the same heads."""
    try:
        event = await down.read_head()
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
        entry = RequestLog(method="-", authority="-", path="-", connection_id=conn_id)
        entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
        if down.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            reason = REASONS.get(status, "Bad Request")
            await answer_locally(down, entry, status, reason.encode(), close=True)
        recorder.finish(entry, down.head_began)
        return None
    if isinstance(event, h11.Request) and (
        len(event.headers) > limits.max_headers or head_size(event) > limits.max_header_bytes
    ):
        entry = entry_for(event, conn_id)
        entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
        await answer_locally(down, entry, 431, b"request headers too large", close=True)
        recorder.finish(entry, down.head_began)
        return None
    return event


async def answer_head_timeout(down: Downstream, recorder: RequestRecorder, conn_id: int) -> None:
    """A head that trickled past its timeout: tell the client, as Envoy does (408). (Keep-alive
    idle, nothing asked, closes quietly: the caller checks `down.head_started`.)"""
    entry = RequestLog(method="-", authority="-", path="-", connection_id=conn_id)
    entry.flags.append(flags.DURATION_TIMEOUT)
    entry.bytes_received = down.received
    await answer_locally(down, entry, 408, b"request header timeout", close=True)
    recorder.finish(entry, down.head_began)
