"""A small sans-IO HTTP/1.1 codec for the common keep-alive exchange; h11 for everything else.

Most requests through the mesh are one plain keep-alive exchange: an HTTP/1.1 head, a body
framed by one `Content-Length` (or none), a response framed the same way. h11 handles every
message with a general state machine, event validation and line-by-line parsing (about a third
of a request's CPU in the proxy). This codec does that one case with less: heads parsed by
httptools (llhttp), the values h11 would refuse checked here, heads written by joining bytes,
bodies counted. It produces and takes h11's event objects and reports h11's states, so the
proxy reads one interface (`H1Codec`, which `h11.Connection` also is) for both codecs.

The decision is taken on a complete head, before anything is handed on: whatever the fast codec
is not sure about raises `NeedsH11`, and the caller hands the bytes received so far, unchanged,
to a fresh `h11.Connection` (`FastServer.handover` / `FastClient.handover`), which then owns the
connection for good. What goes to h11: a head that is not complete (or too large, or cut by
EOF), any llhttp error, a version other than HTTP/1.1, HEAD and CONNECT, `Transfer-Encoding`,
`Upgrade`, `Expect`, a `Connection` header other than `keep-alive`, a Host count other than one,
a target outside h11's characters, a header value with leading or trailing whitespace (llhttp
keeps it, h11 strips it), and on responses a 1xx, 204 or 304 status or one without exactly one
`Content-Length`. Errors are therefore h11's own: the fast codec never refuses a head itself.

llhttp is at least as strict as h11 on what the fast codec accepts: header names are tokens,
values have no CR, LF, NUL or other control byte, one `Content-Length` of digits; what llhttp
accepts beyond h11's rules (bytes >= 0x80 in the target) is checked here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol, TypeVar

import h11
import httptools
from h11._headers import Headers
from h11._util import Sentinel

E = TypeVar("E", h11.Request, h11.Response)

State = type[Sentinel]
NextEvent = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]

_TARGET = re.compile(rb"[\x21-\x7e]+")  # h11's request-target: visible ASCII
_REASON = re.compile(rb"[\x20-\x7e\t\x80-\xff]*")  # stricter than h11's (no other controls)
_WHITESPACE = (0x20, 0x09)
_HEAD_END = b"\r\n\r\n"
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 ends a head
# Request headers that need h11's handling of the exchange (framing, interim answers, upgrade).
_NOT_FAST_REQUEST = frozenset({b"transfer-encoding", b"upgrade", b"expect"})


class NeedsH11(Exception):
    """The fast codec does not handle this exchange: hand the connection over to h11."""


class H1Codec(Protocol):
    """What the proxy reads of an HTTP/1.1 connection: `h11.Connection`'s subset, which both
    h11 and the fast codecs implement."""

    @property
    def our_state(self) -> State: ...

    @property
    def their_state(self) -> State: ...

    @property
    def trailing_data(self) -> tuple[bytes, bool]: ...

    @property
    def they_are_waiting_for_100_continue(self) -> bool: ...

    @property
    def their_http_version(self) -> bytes | None: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> NextEvent: ...

    def send(self, event: h11.Event) -> bytes | None: ...

    def start_next_cycle(self) -> None: ...


# -- pure pieces: parsing a head, deciding, writing -----------------------------------------------


class _Head:
    """httptools' callbacks for one head."""

    __slots__ = ("headers", "reason", "target")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.target = b""
        self.reason = b""

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def _items(headers: Headers) -> list[tuple[bytes, bytes, bytes]]:
    """An h11 event's headers as (raw name, lower-case name, value): the list h11 keeps. Read
    directly (h11's own writers do): its `Sequence` iteration costs a call per item."""
    return headers._full_items


def _framing_of(
    headers: list[tuple[bytes, bytes]], *, request: bool
) -> tuple[list[tuple[bytes, bytes, bytes]], int] | None:
    """A fast head's headers as h11 keeps them and its body length, or None when the head is
    not for the fast codec (see the module doc)."""
    length = -1
    hosts = 0
    items = []
    for name, value in headers:
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
            return None  # h11 strips optional whitespace, llhttp keeps the trailing part
        lower = name.lower()
        items.append((name, lower, value))
        if lower == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif lower == b"connection":
            if any(t.strip(b" \t").lower() != b"keep-alive" for t in value.split(b",")):
                return None
        elif lower == b"host":
            hosts += 1
        elif lower in _NOT_FAST_REQUEST:
            return None
    if request:
        return (items, max(length, 0)) if hosts == 1 else None
    return (items, length) if length >= 0 else None


def parse_request_head(head: bytes) -> tuple[h11.Request, int] | None:
    """A complete request head (ending in CRLF CRLF) as h11 would parse it, and its body
    length; None when it is not for the fast codec."""
    if head[:1] in (b"\r", b"\n"):
        return None  # an empty line first: h11's to skip
    parsed = _Head()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    method = parser.get_method()
    if method in (b"HEAD", b"CONNECT") or parser.get_http_version() != "1.1":
        return None
    if not _TARGET.fullmatch(parsed.target):
        return None
    framing = _framing_of(parsed.headers, request=True)
    if framing is None:
        return None
    items, length = framing
    # The Host count and the method and target characters are checked by h11 here.
    event = h11.Request(method=method, target=parsed.target, headers=Headers(items), _parsed=True)
    return event, length


def parse_response_head(head: bytes) -> tuple[h11.Response, int] | None:
    """A complete response head to a fast request, as h11 would parse it, and its body length;
    None when it is not for the fast codec."""
    parsed = _Head()
    parser = httptools.HttpResponseParser(parsed)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    status = parser.get_status_code()
    if not 200 <= status < 600 or status in (204, 304) or parser.get_http_version() != "1.1":
        return None
    if not head.startswith(b"HTTP/1.1 %d" % status) or not _REASON.fullmatch(parsed.reason):
        return None
    framing = _framing_of(parsed.headers, request=False)
    if framing is None:
        return None
    items, length = framing
    event = h11.Response(
        status_code=status, headers=Headers(items), reason=parsed.reason, _parsed=True
    )
    return event, length


def fast_request(event: h11.Request) -> bool:
    """Whether a request this hop sends upstream can go through `FastClient`."""
    if event.method in (b"HEAD", b"CONNECT") or event.http_version != b"1.1":
        return False
    for _raw, name, _value in _items(event.headers):
        if name in _NOT_FAST_REQUEST or name == b"connection":
            return False
    return True


def _headers_bytes(items: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """h11's header block: Host first, then the rest in order, then the empty line."""
    out = [b"%s: %s\r\n" % (raw, value) for raw, low, value in items if low == b"host"]
    out += [b"%s: %s\r\n" % (raw, value) for raw, low, value in items if low != b"host"]
    out.append(b"\r\n")
    return b"".join(out)


def encode_request(event: h11.Request) -> tuple[bytes, int]:
    """A fast request's head as h11 writes it, and its body length."""
    items = _items(event.headers)
    length = 0
    for _raw, low, value in items:
        if low == b"content-length":
            length = int(value)
    line = b"%s %s HTTP/1.1\r\n" % (event.method, event.target)
    return line + _headers_bytes(items), length


def encode_response(event: h11.Response) -> tuple[bytes, int | None, bool]:
    """A response to a fast request (HTTP/1.1, keep-alive, not HEAD) as h11 writes it: the
    head, the body length (None: chunked) and whether the connection stays open after it."""
    items = _items(event.headers)
    keep_alive = True
    chunked = False
    length: int | None = None
    for _raw, low, value in items:
        if low == b"transfer-encoding":
            chunked = True
        elif low == b"content-length":
            length = int(value)
        elif low == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
            keep_alive = False
    if event.status_code in (204, 304):
        length = 0
    elif chunked or length is None:
        # h11 frames it chunked: no Content-Length, `Transfer-Encoding: chunked` last.
        items = [i for i in items if i[1] not in (b"content-length", b"transfer-encoding")]
        items.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
        length = None
    line = b"HTTP/1.1 %d %s\r\n" % (event.status_code, event.reason)
    return line + _headers_bytes(items), length, keep_alive


class _BodyWriter:
    """h11's body writers: a counted Content-Length body, or chunked (`length` None)."""

    __slots__ = ("left",)

    def __init__(self, length: int | None) -> None:
        self.left = length

    def data(self, data: bytes) -> bytes:
        if self.left is None:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        self.left -= len(data)
        if self.left < 0:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        return data

    def end(self, trailers: Headers) -> bytes:
        if self.left is None:
            return b"0\r\n" + _headers_bytes(_items(trailers))
        if self.left != 0:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        if trailers:
            raise h11.LocalProtocolError("Content-Length and trailers don't mix")
        return b""


# -- the two codecs -----------------------------------------------------------------------------


class _FastConnection:
    """What both sides share: the receive buffer, the states, the body reader and writer."""

    def __init__(self, *, max_head_bytes: int) -> None:
        self._buf = bytearray()
        self._closed = False
        self._max_head = max_head_bytes
        self.our_state: State = h11.IDLE
        self.their_state: State = h11.IDLE
        self._body_left = 0  # of the peer's Content-Length body
        self._writer = _BodyWriter(0)
        self._keep_alive = True

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return bytes(self._buf), self._closed

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return False  # an `Expect` request goes to h11

    @property
    def their_http_version(self) -> bytes | None:
        return b"1.1"  # anything else goes to h11

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._closed:
                raise RuntimeError("received close, then received more data?")
            self._buf += data
        else:
            self._closed = True

    def start_next_cycle(self) -> None:
        if self.our_state is not h11.DONE or self.their_state is not h11.DONE:
            raise h11.LocalProtocolError("not in a reusable state")
        self.our_state = self.their_state = h11.IDLE

    def _settle(self) -> None:
        """h11's state-triggered transitions: one side closed or failed, the other, idle or
        done, must close too."""
        ours, theirs = self.our_state, self.their_state
        if theirs is h11.CLOSED and ours in (h11.IDLE, h11.DONE):
            self.our_state = h11.MUST_CLOSE
        elif ours is h11.CLOSED and theirs in (h11.IDLE, h11.DONE):
            self.their_state = h11.MUST_CLOSE
        elif theirs is h11.ERROR and ours is h11.DONE:
            self.our_state = h11.MUST_CLOSE
        elif ours is h11.ERROR and theirs is h11.DONE:
            self.their_state = h11.MUST_CLOSE

    def _complete_head(self) -> bytes | None:
        """The head at the start of the buffer once it is complete (not taken out of it); None
        while more must come. Raises NeedsH11 where h11 must decide: EOF, too large, a first
        byte h11 refuses at once (a control or a space: an empty line first included), a head
        h11 would see ending elsewhere (its end is LF CR? LF)."""
        buf = self._buf
        if buf and buf[0] < 0x21:
            raise NeedsH11
        blank = _BLANK_LINE.search(buf)
        if blank is None:
            if self._closed or len(buf) > self._max_head:
                raise NeedsH11
            return None
        end = blank.end()
        if end > self._max_head or buf[end - 4 : end] != _HEAD_END:
            raise NeedsH11
        return bytes(buf[:end])

    def _take_head(self, parse: Callable[[bytes], tuple[E, int] | None]) -> E | None:
        """The head at the start of the buffer, parsed by `parse` and taken out of the buffer
        (its body's length kept); None while incomplete, NeedsH11 where `parse` declines."""
        head = self._complete_head()
        if head is None:
            return None
        parsed = parse(head)
        if parsed is None:
            raise NeedsH11
        event, self._body_left = parsed
        del self._buf[: len(head)]
        return event

    def _body_event(self) -> NextEvent:
        """The next piece of the peer's counted body (their_state SEND_BODY)."""
        left = self._body_left
        if left == 0:
            self.their_state = h11.DONE if self._keep_alive else h11.MUST_CLOSE
            return h11.EndOfMessage()
        buf = self._buf
        if not buf:
            if self._closed:
                self.their_state = h11.ERROR
                self._settle()
                raise h11.RemoteProtocolError(
                    "peer closed connection without sending complete message body: "
                    f"{left} bytes missing"
                )
            return h11.NEED_DATA
        data = bytes(buf[:left])
        del buf[:left]
        self._body_left = left - len(data)
        return h11.Data(data=data)

    def _idle_event(self) -> NextEvent:
        """Between messages (their_state DONE): h11's PAUSED, EOF or NEED_DATA."""
        if self._buf:
            return h11.PAUSED
        if self._closed:
            self.their_state = h11.CLOSED
            self._settle()
            return h11.ConnectionClosed()
        return h11.NEED_DATA

    def _send_body(self, event: h11.Event) -> bytes | None:
        """Data, EndOfMessage or ConnectionClosed from us."""
        try:
            if isinstance(event, h11.Data):
                if self.our_state is not h11.SEND_BODY:
                    raise h11.LocalProtocolError("no message body is being sent")
                return self._writer.data(bytes(event.data))
            if isinstance(event, h11.EndOfMessage):
                if self.our_state is not h11.SEND_BODY:
                    raise h11.LocalProtocolError("no message body is being sent")
                data = self._writer.end(event.headers)
                self.our_state = h11.DONE if self._keep_alive else h11.MUST_CLOSE
                if not self._keep_alive and self.their_state is h11.DONE:
                    self.their_state = h11.MUST_CLOSE
                return data
            if isinstance(event, h11.ConnectionClosed):
                self.our_state = h11.CLOSED
                self._settle()
                return None
            raise h11.LocalProtocolError(f"the fast codec cannot send {type(event).__name__} here")
        except h11.LocalProtocolError:
            self._failed()
            raise

    def _failed(self) -> None:
        """Something we sent was refused: our side is in error, as h11's."""
        self.our_state = h11.ERROR
        self._settle()


class FastServer(_FastConnection):
    """The client side of the proxy (h11's SERVER role) for fast exchanges."""

    def next_event(self) -> NextEvent:
        state = self.their_state
        if state is h11.SEND_BODY:
            return self._body_event()
        if state is h11.IDLE:
            event = self._take_head(parse_request_head)
            if event is None:
                if not self._buf and self._closed:
                    self.their_state = h11.CLOSED
                    self._settle()
                    return h11.ConnectionClosed()
                return h11.NEED_DATA
            self.their_state = h11.SEND_BODY
            self.our_state = h11.SEND_RESPONSE
            return event
        return self._idle_event()

    def send(self, event: h11.Event) -> bytes | None:
        if isinstance(event, h11.Response):
            # From IDLE too, as h11: the answer to a head that failed (400, 408, 431).
            if self.our_state not in (h11.SEND_RESPONSE, h11.IDLE):
                self._failed()
                raise h11.LocalProtocolError("no request to answer")
            head, length, keep_alive = encode_response(event)
            if length is None and self.our_state is h11.IDLE:
                # h11 would frame it by the close (no request says the client reads chunked)
                self._failed()
                raise h11.LocalProtocolError("an answer without a request needs Content-Length")
            self._writer = _BodyWriter(length)
            self._keep_alive = keep_alive
            self.our_state = h11.SEND_BODY
            return head
        if isinstance(event, h11.InformationalResponse):
            # Only for Expect and Upgrade requests, which h11 serves.
            self._failed()
            raise h11.LocalProtocolError("an interim response to a request that asked none")
        return self._send_body(event)

    def handover(self, max_incomplete_event_size: int) -> h11.Connection:
        """A fresh h11 server fed every byte this codec received and did not consume (at a
        request boundary: nothing of the current head was taken)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        data, closed = self.trailing_data
        if data:
            conn.receive_data(data)
        if closed:
            conn.receive_data(b"")
        return conn


class FastClient(_FastConnection):
    """An upstream connection (h11's CLIENT role) for fast exchanges; a request that is not
    `fast_request` goes to h11 before it is sent (`UpstreamConnection`)."""

    def __init__(self, *, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes=max_head_bytes)
        self._method = b"GET"

    def next_event(self) -> NextEvent:
        state = self.their_state
        if state is h11.SEND_BODY:
            return self._body_event()
        if state is h11.SEND_RESPONSE:
            event = self._take_head(parse_response_head)
            if event is None:
                if not self._buf and self._closed:
                    raise NeedsH11  # closed before any response: h11 says how
                return h11.NEED_DATA
            self.their_state = h11.SEND_BODY
            return event
        if state is h11.IDLE and self._buf:
            raise NeedsH11  # bytes before any request: h11 says how
        return self._idle_event()

    def send(self, event: h11.Event) -> bytes | None:
        if isinstance(event, h11.Request):
            if self.our_state is not h11.IDLE or not fast_request(event):
                self._failed()
                raise h11.LocalProtocolError("not a request for the fast codec")
            head, length = encode_request(event)
            self._method = event.method
            self._writer = _BodyWriter(length)
            self.our_state = h11.SEND_BODY
            self.their_state = h11.SEND_RESPONSE
            return head
        return self._send_body(event)

    def handover(self, max_incomplete_event_size: int) -> h11.Connection:
        """A fresh h11 client in the state this one is in (its request sent, the response not
        read), fed the response bytes received so far. Only the request's method matters to
        h11 for reading its response (the request had no framing h11 would have to know)."""
        if self.their_state not in (h11.SEND_RESPONSE, h11.IDLE):
            raise h11.LocalProtocolError("the fast codec hands over only before a response")
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_incomplete_event_size)
        if self.their_state is h11.SEND_RESPONSE:
            conn.send(h11.Request(method=self._method, target=b"/", headers=[(b"host", b"-")]))
            if self.our_state is h11.DONE:
                conn.send(h11.EndOfMessage())
        data, closed = self.trailing_data
        if data:
            conn.receive_data(data)
        if closed:
            conn.receive_data(b"")
        return conn
