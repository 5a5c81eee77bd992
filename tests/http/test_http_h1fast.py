"""The fast HTTP/1.1 codec (`nodeagent.http.h1fast`) against h11 on the same bytes.

Differential: hypothesis-made request heads, bodies and pipelined requests go through the
proxy's `Downstream` (framing checks, then the codec) once with the fast codec (which hands
what it is unsure of to h11) and once with h11 alone; both must give the same events, the same
errors (type and status) and, for the same response events, the same bytes and states. The same
for the upstream side (`UpstreamConnection`): the request bytes it writes and the response
events it reads. Then one unit test per fallback trigger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.http.downstream import Downstream
from nodeagent.http.framing import FramingError
from nodeagent.http.h1fast import (
    FastClient,
    FastServer,
    NeedsH11,
    fast_request,
    parse_request_head,
    parse_response_head,
)
from nodeagent.http.limits import Limits
from nodeagent.http.pool import UpstreamConnection

LIMITS = Limits(max_header_bytes=512)
MAX = LIMITS.max_header_bytes

# -- drivers: the same bytes through either codec ------------------------------------------------


@dataclass
class Outcome:
    """What a codec made of the bytes: events, error, bytes it wrote, states along the way."""

    events: list[object] = field(default_factory=list)
    error: tuple[str, int] | None = None
    written: list[bytes] = field(default_factory=list)
    states: list[tuple[str, str]] = field(default_factory=list)


def _states(conn: h11.Connection | FastServer | FastClient) -> tuple[str, str]:
    return (conn.our_state.__name__, conn.their_state.__name__)


def _downstream(fast: bool) -> Downstream:
    a, _b = trio.testing.memory_stream_pair()
    down = Downstream(a, LIMITS)
    if not fast:
        down.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX)
    return down


def _respond(down: Downstream, response: list[h11.Event], out: Outcome) -> bool:
    """Answer the request just read with `response`; whether the connection goes on."""
    try:
        out.written.append(b"".join(down.conn.send(ev) or b"" for ev in response))
    except h11.LocalProtocolError:
        out.written.append(b"<local error>")
        return False
    out.states.append(_states(down.conn))
    if down.conn.our_state is h11.DONE and down.conn.their_state is h11.DONE:
        down.conn.start_next_cycle()
        return True
    return False


def serve(fast: bool, chunks: list[bytes], eof: bool, response: list[h11.Event]) -> Outcome:
    """The client's bytes through `Downstream` as the proxy reads them; every request that
    ends is answered with `response`."""
    down = _downstream(fast)
    out = Outcome()

    def drain() -> bool:
        while True:
            try:
                event = down.buffered_event()
            except h11.RemoteProtocolError as exc:
                out.error = (type(exc).__name__, exc.error_status_hint)
                return False
            if event is h11.NEED_DATA:
                return True
            if event is h11.PAUSED:
                out.events.append("PAUSED")
                return False
            out.events.append(event)
            if isinstance(event, h11.ConnectionClosed):
                return False
            if isinstance(event, h11.EndOfMessage) and not _respond(down, response, out):
                return False

    for chunk in [*chunks, *([b""] if eof else [])]:
        try:
            down.take(chunk)
        except FramingError as exc:
            out.error = ("FramingError", exc.error_status_hint)
            return out
        if not drain():
            return out
    return out


def _upstream(fast: bool) -> UpstreamConnection:
    a, _b = trio.testing.memory_stream_pair()
    up = UpstreamConnection(a, ("10.0.0.1", 80, None), max_header_bytes=MAX)
    if not fast:
        up.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX)
    return up


def exchange(fast: bool, request: list[h11.Event], chunks: list[bytes], eof: bool) -> Outcome:
    """`request` written by `UpstreamConnection`, then the server's bytes read back."""
    up = _upstream(fast)
    out = Outcome()
    try:
        out.written.append(b"".join(up.encode(ev) for ev in request))
    except h11.LocalProtocolError:
        out.written.append(b"<local error>")
        return out
    out.states.append(_states(up.conn))
    for chunk in [*chunks, *([b""] if eof else [])]:
        up.conn.receive_data(chunk)
        while True:
            try:
                event = up.buffered_event()
            except h11.RemoteProtocolError as exc:
                out.error = (type(exc).__name__, exc.error_status_hint)
                return out
            if event is h11.NEED_DATA:
                break
            out.events.append("PAUSED" if event is h11.PAUSED else event)
            out.states.append(_states(up.conn))
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return out
        if up.reusable:
            up.conn.start_next_cycle()
            out.states.append(_states(up.conn))
    return out


# -- strategies ----------------------------------------------------------------------------------

METHODS = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"CONNECT", b"FOO", b"G T"]
)
TARGETS = st.sampled_from([b"/", b"/a?b=c", b"*", b"http://app/x", b"/#f", b"/\x80", b"/\t"]) | (
    st.binary(min_size=1, max_size=6)
)
VERSIONS = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"])
NAMES = st.sampled_from(
    [
        *(b"host", b"Host", b"HOST", b"content-length", b"Content-Length", b"transfer-encoding"),
        *(b"connection", b"Connection", b"expect", b"upgrade", b"te", b"x-a", b"X-Bee"),
        *(b"keep-alive", b"bad name", b"x\x00", b"", b"x:y"),
    ]
) | st.binary(min_size=0, max_size=5)
VALUES = st.sampled_from(
    [
        *(b"", b"app", b"0", b"3", b"12", b"5, 5", b"-1", b"0x1", b"chunked", b"gzip, chunked"),
        *(b"keep-alive", b"close", b"Keep-Alive, close", b"upgrade", b"100-continue"),
        *(b"websocket", b" lead", b"trail ", b"a\tb", b"\tx", b"\x80\xff", b"a\x00b", b"a\x01b"),
        *(b"a\x7fb", b"a\x0bb", b"a\rb", b"a\nb"),
    ]
) | st.binary(max_size=6)
SEPARATORS = st.sampled_from([b" ", b"", b"\t", b"  "])


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    line = b"%s %s %s\r\n" % (draw(METHODS), draw(TARGETS), draw(VERSIONS))
    headers = draw(st.lists(st.tuples(NAMES, SEPARATORS, VALUES), max_size=6))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (b"host", b" ", b"app"))
    head = line + b"".join(b"%s:%s%s\r\n" % h for h in headers) + b"\r\n"
    return head + draw(st.binary(max_size=16))


SIMPLE = (
    b"GET /next HTTP/1.1\r\nhost: app\r\n\r\n",
    b"POST /p HTTP/1.1\r\nhost: app\r\ncontent-length: 3\r\n\r\nabc",
    b"POST /c HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nhost: app\r\n\r\n",
    b"\r\nGET /after-empty-line HTTP/1.1\r\nhost: app\r\n\r\n",
)


@st.composite
def client_stream(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """One or more requests (a generated one among well-formed ones), split at random."""
    parts = draw(st.lists(st.sampled_from(SIMPLE) | request_bytes(), min_size=1, max_size=3))
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    chunks = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [c for c in chunks if c], draw(st.booleans())


RESPONSE_HEADERS = st.lists(
    st.sampled_from(
        [
            ("content-length", "2"),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("connection", "keep-alive"),
            ("Host", "h"),
            ("X-Up", "v"),
            ("server", "s"),
        ]
    ),
    max_size=4,
    unique_by=lambda h: h[0].lower(),
)


@st.composite
def responses(draw: st.DrawFn) -> list[h11.Event]:
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 503]))
    reason = draw(st.sampled_from([b"", b"OK", b"Weird Reason"]))
    headers = draw(RESPONSE_HEADERS)
    body = draw(st.sampled_from([b"", b"ok", b"hello"]))
    head = h11.Response(status_code=status, headers=headers, reason=reason)
    return [head, *([h11.Data(data=body)] if body else []), h11.EndOfMessage()]


# -- differential tests --------------------------------------------------------------------------

DIFF = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@DIFF
@given(client_stream(), responses())
def test_requests_read_and_answered_the_same(stream: tuple[list[bytes], bool], response) -> None:  # type: ignore[no-untyped-def]
    chunks, eof = stream
    assert serve(True, chunks, eof, response) == serve(False, chunks, eof, response)


STATUS_LINES = st.sampled_from(
    [
        *(b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 100 Continue"),
        *(b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 NM", b"HTTP/1.1 101 Switching"),
        *(b"HTTP/1.0 200 OK", b"HTTP/1.1 200 \x01bad", b"HTTP/1.1 2000 OK", b"HTTP/2 200 OK"),
        *(b"HTTP/1.1 200 O\x80K", b"HTTP/1.1 200  OK", b"HTTP/1.1 200 OK ", b"HTTP/1.1 200\tOK"),
    ]
)


@st.composite
def response_bytes(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(NAMES, SEPARATORS, VALUES), max_size=5))
    if draw(st.booleans()):
        headers.append((b"content-length", b" ", b"%d" % draw(st.integers(0, 6))))
    head = draw(STATUS_LINES) + b"\r\n" + b"".join(b"%s:%s%s\r\n" % h for h in headers) + b"\r\n"
    return head + draw(st.binary(max_size=8))


@st.composite
def upstream_requests(draw: st.DrawFn) -> list[h11.Event]:
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"]))
    body = draw(st.sampled_from([b"", b"abc"]))
    headers = [("host", "app"), ("x-request-id", "r")]
    framing = draw(st.sampled_from(["length", "none", "chunked", "upgrade", "close"]))
    if framing == "length":
        headers.append(("content-length", str(len(body))))
    elif framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
    elif framing == "upgrade":
        headers += [("connection", "upgrade"), ("upgrade", "websocket")]
    elif framing == "close":
        headers.append(("connection", "close"))
    head = h11.Request(method=method, target="/x", headers=headers)
    return [head, *([h11.Data(data=body)] if body else []), h11.EndOfMessage()]


@DIFF
@given(upstream_requests(), st.lists(response_bytes(), min_size=1, max_size=2), st.booleans())
def test_upstream_exchange_written_and_read_the_same(  # type: ignore[no-untyped-def]
    request, answers, eof
) -> None:
    data = b"".join(answers)
    chunks = [data[: len(data) // 2], data[len(data) // 2 :]]
    chunks = [c for c in chunks if c]
    assert exchange(True, request, chunks, eof) == exchange(False, request, chunks, eof)


def test_the_common_exchange_takes_the_fast_codec_both_ways() -> None:
    """Without this, the differential tests could pass with everything handed to h11."""
    down = _downstream(True)
    down.take(b"POST /p HTTP/1.1\r\nHost: app\r\ncontent-length: 2\r\n\r\nhiGET / HTTP/1.1\r\n")
    assert isinstance(down.buffered_event(), h11.Request)
    assert down.buffered_event() == h11.Data(data=b"hi")
    assert isinstance(down.buffered_event(), h11.EndOfMessage)
    assert isinstance(down.conn, FastServer)
    up = _upstream(True)
    up.encode(h11.Request(method="GET", target="/", headers=[("host", "app")]))
    up.encode(h11.EndOfMessage())
    up.conn.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert isinstance(up.buffered_event(), h11.Response)
    assert isinstance(up.conn, FastClient)


# -- every fallback trigger ----------------------------------------------------------------------

BASE = b"GET / HTTP/1.1\r\nhost: app\r\n"


@pytest.mark.parametrize(
    "head",
    [
        BASE + b"transfer-encoding: chunked\r\n\r\n",
        BASE + b"upgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        BASE + b"expect: 100-continue\r\ncontent-length: 1\r\n\r\n",
        BASE + b"connection: close\r\n\r\n",
        BASE + b"connection: keep-alive, te\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nhost: app\r\n\r\n",
        b"CONNECT app:443 HTTP/1.1\r\nhost: app:443\r\n\r\n",
        b"GET / HTTP/1.0\r\nhost: app\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        BASE + b"host: other\r\n\r\n",  # two
        BASE + b"content-length: 1\r\ncontent-length: 1\r\n\r\n",
        BASE + b"content-length: +1\r\n\r\n",
        BASE + b"content-length: 1234567890123456789\r\n\r\n",
        b"GET /\x80 HTTP/1.1\r\nhost: app\r\n\r\n",  # llhttp takes it, h11 does not
        BASE + b"x-a: trailing \r\n\r\n",  # llhttp keeps the space, h11 strips it
        BASE + b"x-a: a\x01b\r\n\r\n",  # llhttp refuses, h11 takes it
        BASE + b"bad name: x\r\n\r\n",  # both refuse: h11 says how
        b"FOO / HTTP/1.1\r\nhost: app\r\n\r\n",  # a token method llhttp does not know
        b"\r\nGET / HTTP/1.1\r\nhost: app\r\n\r\n",  # an empty line first
    ],
)
def test_request_heads_the_fast_codec_hands_to_h11(head: bytes) -> None:
    assert parse_request_head(head) is None
    server = FastServer(max_head_bytes=MAX)
    server.receive_data(head)
    with pytest.raises(NeedsH11):
        server.next_event()
    assert server.trailing_data == (head, False)  # nothing consumed: h11 gets every byte


def test_incomplete_head_at_eof_or_too_large_goes_to_h11() -> None:
    server = FastServer(max_head_bytes=MAX)
    server.receive_data(b"GET / HTTP/1.1\r\nhost")
    assert server.next_event() is h11.NEED_DATA
    server.receive_data(b"")
    with pytest.raises(NeedsH11):
        server.next_event()
    big = FastServer(max_head_bytes=MAX)
    big.receive_data(b"GET / HTTP/1.1\r\nx-a: " + b"a" * MAX)
    with pytest.raises(NeedsH11):
        big.next_event()


def test_accepted_request_heads_are_h11s_own() -> None:
    head = b"POST /a?b HTTP/1.1\r\nHost: app\r\nX-Mixed: v  w\r\nContent-Length: 3\r\n\r\n"
    parsed = parse_request_head(head)
    assert parsed is not None
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    assert parsed == (conn.next_event(), 3)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\ncontent-length: 3\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # framed by the close
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1 \r\n\r\n",
        b"HTTP/1.1 200 \x01\r\ncontent-length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\x01\r\ncontent-length: 1\r\n\r\n",
    ],
)
def test_response_heads_the_fast_codec_hands_to_h11(head: bytes) -> None:
    assert parse_response_head(head) is None
    client = FastClient(max_head_bytes=MAX)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "app")]))
    client.send(h11.EndOfMessage())
    client.receive_data(head)
    with pytest.raises(NeedsH11):
        client.next_event()
    conn = client.handover(MAX)  # h11 in the same state, fed the same bytes
    assert conn.their_state is h11.SEND_RESPONSE
    assert conn.trailing_data == (head, False)


def test_upstream_closed_before_a_response_goes_to_h11() -> None:
    up = _upstream(True)
    up.encode(h11.Request(method="GET", target="/", headers=[("host", "app")]))
    up.encode(h11.EndOfMessage())
    up.conn.receive_data(b"")
    with pytest.raises(h11.RemoteProtocolError):
        up.buffered_event()
    assert isinstance(up.conn, h11.Connection)


@pytest.mark.parametrize(
    "headers",
    [
        [("transfer-encoding", "chunked")],
        [("connection", "upgrade"), ("upgrade", "websocket")],
        [("connection", "close")],
        [("expect", "100-continue"), ("content-length", "1")],
    ],
)
def test_upstream_requests_the_fast_codec_leaves_to_h11(headers: list[tuple[str, str]]) -> None:
    event = h11.Request(method="POST", target="/", headers=[("host", "app"), *headers])
    assert not fast_request(event)
    up = _upstream(True)
    up.encode(event)
    assert isinstance(up.conn, h11.Connection)
    for method in ("HEAD", "CONNECT"):
        assert not fast_request(h11.Request(method=method, target="/", headers=[("host", "a")]))


def test_a_body_cut_by_eof_is_h11s_error() -> None:
    for fast in (True, False):
        out = serve(fast, [b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nab"], True, [])
        assert out.error == ("RemoteProtocolError", 400)


def test_fast_writer_refuses_a_body_longer_or_shorter_than_declared() -> None:
    for last in (h11.Data(data=b"toolong"), h11.EndOfMessage()):
        server = FastServer(max_head_bytes=MAX)
        server.receive_data(BASE + b"\r\n")
        server.next_event()
        server.send(h11.Response(status_code=200, headers=[("content-length", "3")]))
        with pytest.raises(h11.LocalProtocolError):
            server.send(last)
        assert server.our_state is h11.ERROR


def test_an_upstream_that_sent_more_than_its_response_is_not_reused() -> None:
    for fast in (True, False):
        up = _upstream(fast)
        up.encode(h11.Request(method="GET", target="/", headers=[("host", "app")]))
        up.encode(h11.EndOfMessage())
        up.conn.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK")
        events = [up.buffered_event() for _ in range(3)]
        assert isinstance(events[2], h11.EndOfMessage)
        assert not up.reusable  # the extra bytes would be the next request's "response"
