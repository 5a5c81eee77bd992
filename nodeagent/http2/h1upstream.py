"""HTTP/2 requests to an HTTP/1.1 upstream (Envoy's HTTP/2 → HTTP/1.1 translation, the HCM's
codec AUTO on an `http` port): each attempt takes a connection from an HTTP/1.1
`nodeagent.http.pool.ConnectionPool` (keep-alive, circuit breaker, TLS origination as for an
HTTP/1.1 client's request) and sends the request as HTTP/1.1 (`translate.py`); the answer reads
back in the shape of an HTTP/2 stream (`H1UpstreamStream`), so the HTTP/2 proxy streams it to
its client the same way: head, DATA, trailers (from chunked trailers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import h11
import trio

from nodeagent.balance import Picker as Cluster
from nodeagent.http.pool import ConnectionPool, UpstreamConnection
from nodeagent.http2.conn import StreamReset
from nodeagent.http2.streams import Headers, Opened, RequestFacts
from nodeagent.http2.translate import h2_response_of_http1, http1_request_of_h2
from nodeagent.snapshot import Endpoint

_FAILED = (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError)


class H1UpstreamStream:
    """One request/response on an HTTP/1.1 upstream connection, read as an HTTP/2 stream."""

    def __init__(self, pool: ConnectionPool, up: UpstreamConnection, *, chunked: bool) -> None:
        self.pool = pool
        self.up = up
        self.headers: Headers | None = None
        self.trailers: Headers | None = None
        self.on_activity: Callable[[], None] | None = None
        self._chunked = chunked
        self._eof = False
        self._next: h11.Event | None = None  # an event read past the head (its end, often)
        self._closed = False

    @property
    def ended(self) -> bool:
        return self._eof or isinstance(self._next, h11.EndOfMessage)

    async def wait_headers(self) -> Headers:
        while self.headers is None:
            event = await self._event()
            if isinstance(event, h11.Response):
                raw = [(bytes(k), bytes(v)) for k, v in event.headers]
                self.headers = h2_response_of_http1(event.status_code, raw)
                with contextlib.suppress(h11.ProtocolError):
                    ready = self.up.conn.next_event()  # no I/O: what is already read
                    if ready is not h11.NEED_DATA and ready is not h11.PAUSED:
                        self._next = ready  # type: ignore[assignment]
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue, 103: not passed on (a 101 cannot be: no Upgrade)
            else:
                raise StreamReset("the upstream closed before its response head", refused=False)
        return self.headers

    async def receive_data(self) -> bytes:
        while not self._eof:
            event: h11.Event | type[h11.PAUSED]
            if self._next is not None:
                event, self._next = self._next, None
            else:
                event = await self._event()
            if isinstance(event, h11.Data):
                if self.on_activity is not None:
                    self.on_activity()
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._eof = True
                if event.headers:
                    self.trailers = [(bytes(k), bytes(v)) for k, v in event.headers]
            else:
                raise StreamReset("the upstream closed in the middle of its response")
        return b""

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        try:
            await self.up.write(self.up.encode(h11.Data(data=data)))
        except _FAILED as exc:
            raise StreamReset(f"upstream send: {exc}") from None
        if self.on_activity is not None:
            self.on_activity()
        if end_stream:
            await self.finish(None)

    async def finish(self, trailers: Headers | None) -> None:
        """The request's end; its trailers as chunked trailers (dropped on a request with a
        content-length, which HTTP/1.1 cannot follow with trailers)."""
        fields = trailers if trailers and self._chunked else []
        try:
            await self.up.write(self.up.encode(h11.EndOfMessage(headers=fields)))
        except _FAILED as exc:
            raise StreamReset(f"upstream send: {exc}") from None

    async def aclose(self) -> None:
        """Back to the pool after a clean exchange, closed otherwise."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if self.up.reusable:
                await self.pool.release(self.up)
            else:
                await self.pool.discard(self.up)

    async def _event(self) -> h11.Event | type[h11.PAUSED]:
        try:
            return await self.up.next_event()
        except _FAILED as exc:
            stale = self.up.reused and not self.up.received_any
            raise StreamReset(f"upstream: {exc}", refused=stale) from None


class H1Upstreams:
    """The HTTP/1.1 upstreams of an HTTP/2 proxy: one pool, shared by its client connections."""

    def __init__(self, pool: ConnectionPool, *, connect_timeout: float) -> None:
        self.pool = pool
        self.connect_timeout = connect_timeout

    async def open(
        self,
        endpoint: Endpoint,
        service_port: int,
        headers: Headers,
        facts: RequestFacts,
        cluster: Cluster,
    ) -> Opened:
        pool_limits = cluster.policy.pool
        began = trio.current_time()
        up = await self.pool.acquire(
            endpoint,
            service_port,
            breaker=cluster.breaker,
            connect_timeout=min(pool_limits.connect_timeout_s, self.connect_timeout),
            idle_timeout=pool_limits.http_idle_timeout_s,
            tls=cluster.policy.tls,
            host=cluster.cluster.rsplit("|", 1)[-1],  # outbound|port|subset|host
        )
        setup = 0.0 if up.reused else trio.current_time() - began
        method, target, fields, chunked = http1_request_of_h2(
            headers, has_body=not facts.end_stream, content_length=facts.content_length
        )
        try:
            data = up.encode(h11.Request(method=method, target=target, headers=fields))
            if facts.end_stream:
                data += up.encode(h11.EndOfMessage())
            await up.write(data)
        except h11.LocalProtocolError as exc:
            await self.pool.discard(up)
            raise StreamReset(f"not an HTTP/1.1 request: {exc}") from None
        except _FAILED as exc:
            stale = up.reused
            await self.pool.discard(up)
            raise StreamReset(f"upstream send: {exc}", refused=stale) from None
        stream = H1UpstreamStream(self.pool, up, chunked=chunked)
        return Opened(stream, up.reused, setup)
