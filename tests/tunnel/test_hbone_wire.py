"""HBONE's sans-IO parts without sockets: CONNECT header building and parsing, statuses, the
SETTINGS, and the pool's bookkeeping on a fake clock (the real pool: test_hbone_pool.py)."""

from __future__ import annotations

import h2.settings
import pytest
import trio

from nodeagent.tunnel.h2conn import HboneConnection
from nodeagent.tunnel.hbone import (
    CONNECTION_WINDOW,
    MAX_FRAME,
    MAX_STREAMS,
    STREAM_WINDOW,
    ConnectRequest,
    HboneError,
    SourceInfo,
    connect_headers,
    parse_connect,
    parse_status,
    settings,
    status_flag,
)
from nodeagent.tunnel.pool import PoolBook

REQ = ConnectRequest(
    "10.1.0.7",
    8080,
    source=SourceInfo("shop", "web-1", "spiffe://cluster.local/ns/shop/sa/web"),
    client="10.1.0.3:40000",
    trace=(("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),),
)


def _wire(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in headers]


def test_connect_headers_round_trip() -> None:
    headers = connect_headers(REQ)
    assert headers[:2] == [(":method", "CONNECT"), (":authority", "10.1.0.7:8080")]
    assert ("forwarded", 'for="10.1.0.3:40000"') in headers
    parsed = parse_connect(_wire(headers))
    assert parsed == REQ


def test_baggage_values_are_percent_encoded() -> None:
    req = ConnectRequest("10.0.0.1", 80, source=SourceInfo("a,b", "c=d"))
    (baggage,) = [v for n, v in connect_headers(req) if n == "baggage"]
    assert baggage == "k8s.namespace.name=a%2Cb,k8s.pod.name=c%3Dd"
    assert parse_connect(_wire(connect_headers(req))).source == SourceInfo("a,b", "c=d")


def test_the_source_reporting_its_requests_is_a_baggage_member() -> None:
    req = ConnectRequest("10.0.0.1", 80, source=SourceInfo("a", "b"), source_reported=True)
    (baggage,) = [v for n, v in connect_headers(req) if n == "baggage"]
    assert baggage == "k8s.namespace.name=a,k8s.pod.name=b,nodeagent.l7=source"
    assert parse_connect(_wire(connect_headers(req))) == req
    assert not parse_connect(_wire(connect_headers(REQ))).source_reported
    # Only the exact member counts (ztunnel and other clients send none).
    other = [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("baggage", "nodeagent.l7=x")]
    assert not parse_connect(_wire(other)).source_reported


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ([(":method", "GET"), (":authority", "10.0.0.1:80")], "only CONNECT"),
        ([(":method", "CONNECT"), (":authority", "web:80")], "not an IP"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1")], "not ip:port"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:0")], "out of range"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:99999")], "out of range"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":protocol", "ws")], "extended"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("baggage", "x" * 2000)], "limit"),
    ],
)
def test_bad_connects_are_400(headers: list[tuple[str, str]], match: str) -> None:
    with pytest.raises(HboneError, match=match) as e:
        parse_connect(_wire(headers))
    assert e.value.status == 400


def test_ipv6_authority_and_unquoted_forwarded() -> None:
    headers = [
        (":method", "CONNECT"),
        (":authority", "[fd00::7]:8080"),
        ("forwarded", "for=1.2.3.4"),
    ]
    req = parse_connect(_wire(headers))
    assert (req.address, req.port, req.client) == ("fd00::7", 8080, "1.2.3.4")


def test_status_parsing_and_flags() -> None:
    assert parse_status([(b":status", b"200")]) == 200
    with pytest.raises(HboneError):
        parse_status([(b":status", b"20x")])
    with pytest.raises(HboneError):
        parse_status([(b"x", b"y")])
    assert [status_flag(s) for s in (401, 400, 503, 502)] == [
        "denied",
        "bad_request",
        "unavailable",
        "refused",
    ]


def test_settings_are_ztunnels() -> None:
    codes = h2.settings.SettingCodes
    server, client = settings(client=False), settings(client=True)
    assert server[codes.INITIAL_WINDOW_SIZE] == client[codes.INITIAL_WINDOW_SIZE] == STREAM_WINDOW
    assert server[codes.MAX_FRAME_SIZE] == MAX_FRAME == 1 << 20
    assert server[codes.MAX_CONCURRENT_STREAMS] == MAX_STREAMS == 100
    assert client[codes.ENABLE_PUSH] == 0
    assert (STREAM_WINDOW, CONNECTION_WINDOW) == (4 << 20, 16 << 20)


KEY = ("spiffe://td/ns/a/sa/a", "spiffe://td/ns/b/sa/b", "10.0.0.2")


def test_book_fills_a_connection_up_to_the_limit_then_adds_one() -> None:
    book: PoolBook[str] = PoolBook(max_streams=2, idle_timeout=10)
    assert book.pick(KEY, lambda c: True) is None
    first = book.add(KEY, "c1", now=0)
    book.stream_opened(first, reused=False)
    assert book.pick(KEY, lambda c: True) is first
    book.stream_opened(first, reused=True)
    assert book.pick(KEY, lambda c: True) is None  # full: the caller opens another
    second = book.add(KEY, "c2", now=0)
    book.stream_opened(second, reused=False)
    assert book.pick(("x", "y", "z"), lambda c: True) is None  # another key shares nothing
    assert (book.stats.connections_opened, book.stats.streams_reused) == (2, 1)


def test_book_idle_expiry_on_a_fake_clock() -> None:
    book: PoolBook[str] = PoolBook(max_streams=100, idle_timeout=10)
    entry = book.add(KEY, "c1", now=100)
    book.stream_opened(entry, reused=False)
    assert book.expired(now=1000) == []  # a stream is open: never idle
    book.stream_closed(entry, now=200)
    assert book.next_expiry() == 210
    assert book.expired(now=209.9) == []
    assert book.expired(now=210) == [entry]
    book.remove(entry)
    assert book.entries() == []


def test_book_skips_unusable_and_retired_connections() -> None:
    book: PoolBook[str] = PoolBook(max_streams=100, idle_timeout=10)
    old = book.add(KEY, "rotated", now=0)
    book.stream_opened(old, reused=False)
    assert book.pick(KEY, lambda c: c != "rotated") is None
    assert old.retired
    book.stream_closed(old, now=1)
    assert book.expired(now=1) == [old]  # retired: closed as soon as its streams are done


async def test_a_connection_past_its_goaway_is_not_pinged() -> None:
    """h2 refuses every frame to send once a GOAWAY went either way: the keepalive falling due
    while the pool closes an idle connection must end quietly, not raise (a raise there took
    the whole tunnel pool down in CI)."""
    conn = HboneConnection(
        None,  # type: ignore[arg-type]  # nothing here touches the socket
        client=True,
        peer_identity="spiffe://cluster.local/ns/shop/sa/web",
        peer_certificate=b"",
        ping_interval=0.01,
    )
    conn.h2.close_connection()  # what close() does before flushing
    assert await conn.ping(1) is False
    with trio.fail_after(1):
        await conn._keepalive()  # returns instead of raising ProtocolError
    assert conn.error == ""  # a closing connection is not failed as "peer gone"
