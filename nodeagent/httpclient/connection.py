"""One HTTP/1.1 client connection: h11 over a trio stream, plain or TLS, with bounded reads.

`HttpConnection.open(host, port, …)` connects (TCP, or a caller's `connector` such as an
in-memory stream in tests), wraps TLS when given an `ssl.SSLContext` (client certificates are
the context's), then carries one request at a time: `send(method, target, headers, body)` with a
whole body (Content-Length) or a streamed one (chunked), `read_head()` for the status,
`read_chunk()` / `read_body(limit)` for the body. Keep-alive is the caller's choice: after a
complete exchange `reusable()` readies the connection for the next request, and `stale()` tells
whether an idle one was closed by the server meanwhile.

Failures raise the errors of `errors.py` (NotSent before the request fully left, Lost after,
ProtocolError for bad HTTP or a bound exceeded); callers translate them into their own types and
add where. Timeouts are the caller's (trio cancel scopes).
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Self

import h11
import trio

from nodeagent.httpclient.errors import ConnectError, Lost, NotSent, ProtocolError

MAX_BODY = 64 << 20
MAX_HEAD = 64 << 10  # status line + headers: h11 refuses anything larger
RECEIVE_SIZE = 1 << 16

Connector = Callable[[], Awaitable[trio.abc.Stream]]
Body = bytes | AsyncIterable[bytes]

_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _connect_reason(exc: OSError) -> str:
    """The OS's words for a failed connect. trio says "all attempts to connect to … failed"
    and keeps each attempt's error in the cause: the first one with words says why."""
    if exc.strerror:
        return exc.strerror
    cause = exc.__cause__
    attempts = cause.exceptions if isinstance(cause, BaseExceptionGroup) else (cause,)
    for attempt in attempts:
        if isinstance(attempt, OSError) and attempt.strerror:
            return attempt.strerror
    return str(exc)


class HttpConnection:
    """One client connection; one request at a time. `peer` names the server in messages."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        host_header: str,
        *,
        sock: trio.socket.SocketType | None = None,
        peer: str = "the server",
    ) -> None:
        self._stream = stream
        self._sock = sock
        self._host_header = host_header
        self._peer = peer
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._eof = False

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        host_header: str,
        ssl_context: ssl.SSLContext | None = None,
        connector: Connector | None = None,
        peer: str = "the server",
    ) -> Self:
        """Connect to `host:port` (or call `connector`), then the TLS handshake if asked.
        Raises ConnectError or NotSent; nothing is left open on failure."""
        sock: trio.socket.SocketType | None = None
        try:
            if connector is not None:
                stream = await connector()
            else:
                tcp = await trio.open_tcp_stream(host, port)
                # requests are small writes answered at once: Nagle would only add latency
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream, sock = tcp, tcp.socket
        except OSError as exc:
            raise ConnectError(_connect_reason(exc)) from None
        if ssl_context is None:
            return cls(stream, host_header, sock=sock, peer=peer)
        tls = trio.SSLStream(stream, ssl_context, server_hostname=host)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            await trio.aclose_forcefully(stream)
            raise NotSent(f"TLS handshake: {exc.__cause__ or exc}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)  # cancelled (a timeout): do not leak the socket
            raise
        return cls(tls, host_header, sock=sock, peer=peer)

    def stale(self) -> bool:
        """True if the server closed this idle connection (or sent something unasked).
        A connection without a socket to poll (a `connector`'s) counts as stale."""
        if self._sock is None:
            return True
        # an idle keep-alive connection has nothing to read; readable means EOF or garbage
        poller = select.poll()
        try:
            poller.register(self._sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    async def _send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except _IO_ERRORS as exc:
            raise NotSent(f"send: {exc.__cause__ or exc}") from None

    def _encode(self, event: h11.Event) -> bytes:
        try:
            return self._h11.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise NotSent(f"send: {exc}") from None

    async def send(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: Body = b""
    ) -> None:
        """Send one request: `Host` and the framing header are added here. Raises NotSent if
        any of it failed to go out (errors of a streamed body's own iterator propagate)."""
        if isinstance(body, bytes):
            framing = ("Content-Length", str(len(body)))
        else:
            framing = ("Transfer-Encoding", "chunked")
        request = h11.Request(
            method=method, target=target, headers=[("Host", self._host_header), framing, *headers]
        )
        head = self._encode(request)
        if isinstance(body, bytes):
            # one write for the whole request: one TLS record, one segment when it fits
            await self._send_all(head + self._encode(h11.Data(data=body)) + self._eof_bytes())
            return
        await self._send_all(head)
        async for piece in body:
            if piece:
                await self._send_all(self._encode(h11.Data(data=piece)))
        await self._send_all(self._eof_bytes())

    def _eof_bytes(self) -> bytes:
        return self._encode(h11.EndOfMessage())

    async def _next(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            waiting = self._h11.their_state is h11.SEND_RESPONSE
            try:
                ev = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self._h11.their_state is h11.ERROR and self._eof:
                    # the peer went away mid-message: a lost connection, not bad HTTP
                    if waiting:
                        raise Lost(f"{self._peer} closed the connection before answering") from None
                    raise Lost(f"{self._peer} closed the connection mid-response ({exc})") from None
                raise ProtocolError(f"bad HTTP from {self._peer}: {exc}") from None
            if ev is not h11.NEED_DATA:
                return ev  # type: ignore[return-value]
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except _IO_ERRORS as exc:
                raise Lost(f"receive: {exc.__cause__ or exc}") from None
            self._eof = not data
            try:
                self._h11.receive_data(bytes(data))
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"bad HTTP from {self._peer}: {exc}") from None

    async def read_head(self) -> int:
        """The response's status code (informational 1xx responses are skipped)."""
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Response):
                return ev.status_code
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.ConnectionClosed):
                raise Lost(f"{self._peer} closed the connection before answering")
            raise ProtocolError(f"unexpected {type(ev).__name__} before the response")

    async def read_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Data):
                if ev.data:
                    return bytes(ev.data)
                continue
            if isinstance(ev, h11.EndOfMessage):
                return None
            if isinstance(ev, h11.ConnectionClosed):
                raise Lost(f"{self._peer} closed the connection mid-response")
            raise ProtocolError(f"unexpected {type(ev).__name__} in the response body")

    async def read_body(self, limit: int = MAX_BODY) -> bytes:
        """The rest of the body, whole; more than `limit` bytes is a ProtocolError."""
        body = bytearray()
        while (chunk := await self.read_chunk()) is not None:
            body += chunk
            if len(body) > limit:
                raise ProtocolError(f"response body over the {limit} byte bound")
        return bytes(body)

    def reusable(self) -> bool:
        """After a complete exchange: ready the connection for the next request and say so."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            try:
                self._h11.start_next_cycle()
            except h11.LocalProtocolError:
                return False
            return True
        return False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)
