"""An HTTP/1.1 client connection served by the HTTP/2 proxy (Envoy's HTTP/1.1 → HTTP/2
translation): each request of the keep-alive loop becomes an `H1ClientStream`, the shape of an
`H2Stream` the proxy's request path (`proxy.H2Proxy._request`) takes, so the request is routed,
retried and forwarded over a pooled HTTP/2 upstream stream exactly as an HTTP/2 client's. The
HTTP/1.1 proxy hands over single requests the same way (`H2Proxy.forward_http1`: a request it
routed to an HTTP/2 port), on its own `Downstream`.

Reading is `nodeagent.http.downstream.Downstream`'s (framing checks, head timeouts, 400/431
answers: every hop refuses the same heads); writing goes through one writer task per connection,
as `H2Connection`'s: the stream's `send_headers`, `send_trailers`, `end` never block, `send_data`
waits until its bytes are written (back-pressure). The answer is HTTP/1.1 with the upstream's
`content-length`, else chunked; trailers (gRPC's `grpc-status`) become chunked trailers for a
client that sent `TE: trailers`, and are dropped otherwise. An answer that cannot complete (the
upstream reset mid-body) closes the connection: HTTP/1.1's only way to say so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import h11
import trio

from nodeagent.http.downstream import Downstream, Drain
from nodeagent.http.errors import DownstreamError
from nodeagent.http.limits import Limits
from nodeagent.http2.conn import StreamReset
from nodeagent.http2.translate import (
    Headers,
    h2_request_of_http1,
    has_length,
    http1_response_of_h2,
    reason_phrase,
    wants_trailers,
)

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Writer:
    """The connection's only writer: queued bytes go out in order, in as few writes as can."""

    def __init__(self, down: Downstream) -> None:
        self.down = down
        self.out: list[bytes] = []
        self.error = ""
        self.sending = False
        self._kick = trio.Event()
        self._drained = trio.lowlevel.ParkingLot()

    def queue(self, data: bytes) -> None:
        if data and not self.error:
            self.out.append(data)
            self._kick.set()

    async def run(self) -> None:
        try:
            while True:
                await self._kick.wait()
                self._kick = trio.Event()
                while self.out:
                    data = b"".join(self.out)
                    self.out.clear()
                    self.sending = True
                    await self.down.io.send_all(data)
                    self.sending = False
                self._drained.unpark_all()
        except _BROKEN as exc:
            self.error = f"send: {exc}"
            self.out.clear()
            self.sending = False
            self._drained.unpark_all()

    async def drain(self) -> None:
        """Until everything queued is written (or the connection broke)."""
        while (self.out or self.sending) and not self.error:
            await self._drained.park()
        await trio.lowlevel.checkpoint()


class H1ClientStream:
    """One HTTP/1.1 request and its answer, as the HTTP/2 proxy sees a stream."""

    def __init__(
        self, conn: H1ClientConnection, method: bytes, target: bytes, raw: Headers
    ) -> None:
        self.conn = conn
        self.headers: Headers | None = h2_request_of_http1(
            method, target, raw, scheme=conn.down.scheme
        )
        self.trailers: Headers | None = None
        self.error = ""
        self.on_fail: Callable[[], None] | None = None
        self.on_activity: Callable[[], None] | None = None
        self.received_bytes = 0
        self.sent_bytes = 0
        self.head_sent = False
        self.complete = False  # the whole answer went out (EndOfMessage)
        self._head_request = method == b"HEAD"
        self._te_trailers = wants_trailers(raw)
        self._chunked = False
        self._eof = conn.down.body_done()
        self._sent_continue = False

    # -- the request body -----------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._eof

    async def receive_data(self) -> bytes:
        """The next piece of the request body; b"" at its end (then `trailers`, if chunked
        trailers came)."""
        down = self.conn.down
        while not self._eof:
            if self.error:
                raise StreamReset(self.error)
            if down.conn.they_are_waiting_for_100_continue and not self._sent_continue:
                self._sent_continue = True  # the proxy forwards: the client may upload now
                self._queue(h11.InformationalResponse(status_code=100, headers=[]))
            try:
                event = await down.next_event()
            except (h11.ProtocolError, DownstreamError, *_BROKEN) as exc:
                self._fail(f"client request body: {exc}")
                raise StreamReset(self.error) from None
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                self.received_bytes += len(data)
                if self.on_activity is not None:
                    self.on_activity()
                if data:
                    return data
            elif isinstance(event, h11.EndOfMessage):
                self._eof = True
                if event.headers:
                    self.trailers = [(bytes(k), bytes(v)) for k, v in event.headers]
                self.conn.watch_client(self)
            else:
                self._fail(f"unexpected {type(event).__name__} in the request body")
                raise StreamReset(self.error)
        return b""

    # -- the answer -------------------------------------------------------------------------

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        if self.error:
            raise StreamReset(self.error)
        if self.head_sent:  # trailers
            self.send_trailers(headers)
            return
        status, fields = http1_response_of_h2(
            headers, end_stream=end_stream, head_request=self._head_request
        )
        self._chunked = not has_length(fields) and self.conn.down.conn.their_http_version == b"1.1"
        if self.conn.down.drain.on:  # the agent drains: the client reconnects (to its successor)
            fields.append((b"connection", b"close"))
            self.conn.keep = False
        self.head_sent = True
        self._queue(h11.Response(status_code=status, headers=fields, reason=reason_phrase(status)))
        if end_stream:
            self.end()

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        if self.error:
            raise StreamReset(self.error)
        if data:
            self._queue(h11.Data(data=data))
            self.sent_bytes += len(data)
            if self.on_activity is not None:
                self.on_activity()
        await self.conn.writer.drain()
        if self.conn.writer.error:
            self._fail(self.conn.writer.error)
            raise StreamReset(self.error)
        if end_stream:
            self.end()

    def send_trailers(self, trailers: Headers) -> None:
        """Chunked trailers for a client that accepts them; otherwise they are dropped."""
        if self._te_trailers and self._chunked:
            fields = [(k, v) for k, v in trailers if not k.startswith(b":")]
            self._queue(h11.EndOfMessage(headers=fields))
            self.complete = True
        else:
            self.end()

    def end(self) -> None:
        if not self.complete and not self.error:
            self._queue(h11.EndOfMessage())
            self.complete = True

    def reset(self, code: int = 0) -> None:
        """An HTTP/1.1 answer cannot be reset: the connection closes (after what was sent)."""
        self.on_fail = None
        self.conn.keep = False
        self._fail("stream reset")

    def _queue(self, event: h11.Event) -> None:
        try:
            data = self.conn.down.conn.send(event)
        except h11.LocalProtocolError as exc:  # e.g. a body on a HEAD answer
            self.conn.keep = False
            self._fail(f"http/1.1 answer: {exc}")
            raise StreamReset(self.error) from None
        self.conn.writer.queue(data or b"")

    def _fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
            if self.on_fail is not None:
                self.on_fail()

    def client_gone(self) -> None:
        self.conn.keep = False
        self._fail("the client closed its connection")


Handler = Callable[[H1ClientStream], Awaitable[None]]


class H1ClientConnection:
    """One HTTP/1.1 client connection's keep-alive loop, each request handed to `handle`."""

    def __init__(self, down: Downstream) -> None:
        self.down = down
        self.writer = _Writer(down)
        self.keep = True
        self._watch: trio.CancelScope | None = None

    @classmethod
    def of(
        cls, client: trio.abc.Stream, limits: Limits, *, address: str, drain: Drain | None = None
    ) -> H1ClientConnection:
        down = Downstream(client, limits, drain)
        down.address = address
        return cls(down)

    def stream_of(self, request: h11.Request) -> H1ClientStream:
        raw = [(bytes(k), bytes(v)) for k, v in request.headers]
        return H1ClientStream(self, bytes(request.method), bytes(request.target), raw)

    def unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def reusable(self, stream: H1ClientStream) -> bool:
        """The exchange ended cleanly on both sides: the connection can serve another."""
        conn = self.down.conn
        return (
            self.keep
            and stream.complete
            and not self.writer.error
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
        )

    def watch_client(self, stream: H1ClientStream) -> None:
        """Once the request is read: a client that closes meanwhile fails the stream (the
        proxy then stops the request, as an HTTP/2 client's reset does)."""
        if self._watch is None:
            self._watch = self.down.watch_close(stream.client_gone)

    async def serve(
        self,
        handle: Handler,
        read_request: Callable[[Downstream], Awaitable[object]],
        head_timeout: Callable[[Downstream], Awaitable[None]],
    ) -> None:
        """Serve requests until the client closes or a request cannot keep the connection."""
        down = self.down
        try:
            async with trio.open_nursery() as nursery:
                down.tasks = nursery
                nursery.start_soon(self.writer.run)
                with down.head_timer:
                    while self.keep:
                        event = await read_request(down)
                        if not isinstance(event, h11.Request):
                            break
                        if not await self._one(handle, event):
                            break
                        down.conn.start_next_cycle()
                await self.writer.drain()
                if down.head_timer.cancelled_caught and down.head_started:
                    await head_timeout(down)  # a head that trickled past its timeout: 408
                nursery.cancel_scope.cancel()
        except (DownstreamError, h11.ProtocolError, *_BROKEN):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await down.stream.aclose()

    async def _one(self, handle: Handler, request: h11.Request) -> bool:
        """Serve one request; returns whether the connection can serve another."""
        stream = self.stream_of(request)
        if stream.ended:
            self.watch_client(stream)
        try:
            await handle(stream)
        finally:
            self.unwatch()
        if not stream.complete and not stream.head_sent and not stream.error:
            # the request path always answers; a stream left unanswered is a bug: say so
            with contextlib.suppress(StreamReset):
                stream.send_headers([(b":status", b"502")], end_stream=True)
        await self.writer.drain()
        # an answer before the whole request body (or a broken answer): close, as HTTP/1.1
        # cannot tell where the unread body ends
        self.keep = self.reusable(stream)
        return self.keep
