"""HTTP/1.1 for the etcd JSON gateway: h11 over trio streams, and a sans-IO JSON-lines parser.

The gateway answers unary calls with one JSON object and streams (`/v3/watch`) with a chunked
body of newline-delimited JSON objects. `JsonLines` turns bytes into those objects with a bound
on each message; `HttpConnection` sends one request at a time on one connection and tells
whether a failure happened before the request was fully sent (safe to retry anywhere) or after
(the server may have applied it). Timeouts are the caller's (trio cancel scopes).
"""

from __future__ import annotations

import json
import select
import socket
import ssl
from typing import Any

import h11
import trio

MAX_MESSAGE = 16 << 20
MAX_BODY = 64 << 20
NEED_DATA = None


class ProtocolError(Exception):
    """The server sent something that is not the HTTP/JSON the gateway speaks."""


class NotSent(Exception):
    """The request did not reach the server in full: retrying cannot apply it twice."""


class Lost(Exception):
    """The connection failed after the request was sent: the server may have applied it."""


class JsonLines:
    """Sans-IO: `receive_data(bytes)` then `next_event()` → a JSON object or NEED_DATA."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._scanned = 0

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> dict[str, Any] | None:
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > self._max:
                    raise ProtocolError(f"a JSON message is over the {self._max} byte bound")
                return NEED_DATA
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            self._scanned = 0
            if len(line) > self._max:
                raise ProtocolError(f"a JSON message is over the {self._max} byte bound")
            if line.strip():
                return parse_object(line)

    def finish(self) -> dict[str, Any] | None:
        """At end of stream: a last message not followed by a newline, if any."""
        rest = bytes(self._buf).strip()
        self._buf.clear()
        self._scanned = 0
        return parse_object(rest) if rest else None


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


class HttpConnection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType, host: str) -> None:
        self._stream = stream
        self._sock = sock
        self._host = host
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 << 10)
        self.used = False
        self._eof = False

    @classmethod
    async def connect(
        cls, host: str, port: int, host_header: str, ssl_context: ssl.SSLContext | None
    ) -> HttpConnection:
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise NotSent(f"connect: {exc.strerror or exc}") from None
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = tcp.socket
        if ssl_context is None:
            return cls(tcp, sock, host_header)
        tls = trio.SSLStream(tcp, ssl_context, server_hostname=host)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            await trio.aclose_forcefully(tcp)
            cause = exc.__cause__ or exc
            raise NotSent(f"TLS handshake: {cause}") from None
        return cls(tls, sock, host_header)

    def stale(self) -> bool:
        """True if the server closed this idle connection (or sent something unasked)."""
        # an idle keep-alive connection has nothing to read; readable means EOF or garbage
        poller = select.poll()
        try:
            poller.register(self._sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    async def _send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            await self._stream.send_all(data)

    async def send_request(self, target: str, body: bytes, headers: list[tuple[str, str]]) -> None:
        """POST `body` as JSON; raises NotSent if any of it failed to go out."""
        self.used = True
        req = h11.Request(
            method="POST",
            target=target,
            headers=[
                ("Host", self._host),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                *headers,
            ],
        )
        try:
            await self._send(req)
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise NotSent(f"send: {exc.__cause__ or exc}") from None
        except h11.LocalProtocolError as exc:
            raise NotSent(f"send: {exc}") from None

    async def _next(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                ev = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self._h11.their_state is h11.ERROR and self._eof:
                    # the peer went away mid-message: a lost connection, not bad HTTP
                    raise Lost(f"the server closed the connection mid-response ({exc})") from None
                raise ProtocolError(f"bad HTTP from the server: {exc}") from None
            if ev is not h11.NEED_DATA:
                return ev  # type: ignore[return-value]
            try:
                data = await self._stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise Lost(f"receive: {exc.__cause__ or exc}") from None
            self._eof = not data
            try:
                self._h11.receive_data(bytes(data))
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"bad HTTP from the server: {exc}") from None

    async def read_head(self) -> int:
        """The response's status code."""
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Response):
                return ev.status_code
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.ConnectionClosed):
                raise Lost("the server closed the connection before answering")
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
                raise Lost("the server closed the connection mid-response")
            raise ProtocolError(f"unexpected {type(ev).__name__} in the response body")

    async def read_body(self, limit: int = MAX_BODY) -> bytes:
        body = bytearray()
        while (chunk := await self.read_chunk()) is not None:
            body += chunk
            if len(body) > limit:
                raise ProtocolError(f"response body over the {limit} byte bound")
        return bytes(body)

    def reusable(self) -> bool:
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            try:
                self._h11.start_next_cycle()
            except h11.LocalProtocolError:
                return False
            return True
        return False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)
