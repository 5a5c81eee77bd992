"""`classify`: the h2 preface, an HTTP/1.x request line, or TCP, from a connection's first
bytes, byte by byte; `sniff` on a real socket pair (peeked bytes stay for the reader)."""

from __future__ import annotations

import socket

import trio
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.http2.sniff import PREFACE, classify, classify_declared, sniff


def test_the_preface_is_h2_only_once_complete() -> None:
    for n in range(1, len(PREFACE)):
        assert classify(PREFACE[:n]) is None
    assert classify(PREFACE) == "h2"
    assert classify(PREFACE + b"\x00\x00") == "h2"


def test_an_http1_request_line_is_http1() -> None:
    assert classify(b"GET / HTTP/1.1\r\n") == "http1"
    assert classify(b"POST ") == "http1"
    assert classify(b"PRI ") is None  # the preface so far
    assert classify(b"PRI /x HTTP/1.1\r\n") == "http1"  # a PRI request, not the preface
    assert classify(b"GE") is None
    assert classify(b"P") is None  # could still be the preface or POST


def test_other_bytes_are_tcp() -> None:
    assert classify(b"\x16\x03\x01\x02\x00") == "tcp"  # a TLS ClientHello
    assert classify(b"\r\n") == "tcp"
    assert classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n") == "tcp"  # a broken preface
    assert classify(b"A" * 30) == "tcp"  # no method is that long


@given(st.binary(max_size=40))
def test_classify_never_fails_and_is_stable_once_decided(data: bytes) -> None:
    got = classify(data)
    if got in ("http1", "tcp"):
        assert classify(data + b"more") == got


async def test_sniff_peeks_and_times_out_to_tcp() -> None:
    a, b = socket.socketpair()
    with a, b:
        ta, tb = trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)
        assert await sniff(tb, 0.05) == "tcp"  # nothing said: a server-first protocol
        await ta.send(PREFACE[:10])
        assert await sniff(tb, 0.05) == "tcp"  # stalled inside the preface: give up
        await ta.send(PREFACE[10:])
        assert await sniff(tb, 1) == "h2"
        assert await tb.recv(100) == PREFACE  # the bytes are still there for the proxy


def test_on_a_declared_port_the_first_byte_off_the_preface_says_http1() -> None:
    assert classify_declared(b"G") == "http1"  # no waiting for a trickled request line
    assert classify_declared(b"PO") == "http1"
    assert classify_declared(b"PRO") == "http1"  # PROPFIND
    assert classify_declared(b"PR") is None
    assert classify_declared(PREFACE[:-1]) is None
    assert classify_declared(PREFACE + b"\x00") == "h2"
    assert classify_declared(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n") == "http1"


@given(st.binary(min_size=1, max_size=40))
def test_declared_classification_is_h2_only_for_the_preface(data: bytes) -> None:
    got = classify_declared(data)
    if data.startswith(PREFACE):
        assert got == "h2"
    elif PREFACE.startswith(data):
        assert got is None
    else:
        assert got == "http1"
