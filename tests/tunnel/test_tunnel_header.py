"""The tunnel header codec: round trips, byte-at-a-time feeding, bounds and bad input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.tunnel.header import (
    MAX_BODY,
    NEED_DATA,
    HeaderError,
    HeaderParser,
    SourceInfo,
    TunnelRequest,
    TunnelResponse,
    encode_request,
    encode_response,
)

REQ = TunnelRequest(
    port=8080,
    source=SourceInfo("shop", "web-1", "spiffe://cluster.local/ns/shop/sa/web", "10.0.1.1"),
    trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
)


def frame(body: object, version: int = 1) -> bytes:
    data = msgpack.packb(body)
    return b"MT" + struct.pack("!BH", version, len(data)) + data


def parse_one(data: bytes) -> object:
    p = HeaderParser("request")
    p.receive_data(data)
    return p.next_event()


def test_request_round_trip_with_trailing_stream_bytes() -> None:
    p = HeaderParser("request")
    p.receive_data(encode_request(REQ) + b"GET / HTTP/1.1\r\n")
    assert p.next_event() == REQ
    assert p.trailing_data == b"GET / HTTP/1.1\r\n"
    p.receive_data(b"more")
    assert p.trailing_data == b"GET / HTTP/1.1\r\nmore"


def test_response_round_trip() -> None:
    p = HeaderParser("response")
    p.receive_data(encode_response(TunnelResponse(403, "denied by shop/deny-all")))
    ev = p.next_event()
    assert ev == TunnelResponse(403, "denied by shop/deny-all")
    assert isinstance(ev, TunnelResponse)
    assert not ev.ok


def test_byte_at_a_time() -> None:
    p = HeaderParser("request")
    data = encode_request(REQ)
    for b in data[:-1]:
        p.receive_data(bytes([b]))
        assert p.next_event() is NEED_DATA
    p.receive_data(data[-1:])
    assert p.next_event() == REQ


@pytest.mark.parametrize("cut", [0, 1, 2, 4, 5, 20])
def test_truncated_frame_needs_data(cut: int) -> None:
    p = HeaderParser("request")
    p.receive_data(encode_request(REQ)[:cut])
    assert p.next_event() is NEED_DATA


def test_unknown_version_is_refused_from_its_byte() -> None:
    p = HeaderParser("request")
    with pytest.raises(HeaderError, match="unknown header version 2"):
        p.receive_data(b"MT\x02")


def test_oversized_body_is_refused_before_buffering() -> None:
    p = HeaderParser("request")
    with pytest.raises(HeaderError, match="over the 8192-byte limit"):
        p.receive_data(b"MT\x01" + struct.pack("!H", MAX_BODY + 1))


def test_encoder_refuses_an_oversized_header() -> None:
    with pytest.raises(HeaderError, match="over the"):
        encode_request(TunnelRequest(80, trace={f"k{i}": "x" * 1000 for i in range(10)}))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"GET / HTTP/1.1\r\n", "bad magic"),
        (b"\x16\x03\x01", "bad magic"),  # a TLS ClientHello inside the tunnel
        (frame([1, 2]), "not a map"),
        (frame({"port": 0}), "'port' must be an integer"),
        (frame({"port": 70000}), "'port' must be an integer"),
        (frame({"port": "80"}), "'port' must be an integer"),
        (frame({"port": True}), "'port' must be an integer"),
        (frame({}), "'port' must be an integer"),
        (frame({"port": 80, "src": "me"}), "'src' must be a map"),
        (frame({"port": 80, "src": {"ns": 3}}), "'ns' must be a string"),
        (frame({"port": 80, "trace": {"a": 1}}), "'trace' must be a map of strings"),
        (b"MT\x01\x00\x02\xc1\xc1", "undecodable"),
    ],
)
def test_malformed_requests(data: bytes, match: str) -> None:
    with pytest.raises(HeaderError, match=match):
        parse_one(data)


def test_malformed_response_code() -> None:
    p = HeaderParser("response")
    p.receive_data(frame({"code": 9000}))
    with pytest.raises(HeaderError, match="'code'"):
        p.next_event()


@given(st.binary(max_size=512))
def test_fuzz_never_crashes_and_stays_bounded(data: bytes) -> None:
    for kind in ("request", "response"):
        p = HeaderParser(kind)  # type: ignore[arg-type]
        try:
            p.receive_data(data)
            p.next_event()
        except HeaderError:
            pass


@given(
    port=st.integers(1, 65535),
    text=st.text(max_size=200),
    trace=st.dictionaries(st.text(max_size=20), st.text(max_size=50), max_size=5),
    split=st.integers(0, 400),
)
def test_fuzz_round_trip_any_split(port: int, text: str, trace: dict[str, str], split: int) -> None:
    req = TunnelRequest(port, SourceInfo(text, text, text, text), trace)
    data = encode_request(req)
    p = HeaderParser("request")
    p.receive_data(data[:split])
    p.receive_data(data[split:])
    assert p.next_event() == req
