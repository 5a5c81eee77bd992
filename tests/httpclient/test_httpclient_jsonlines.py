"""Newline-delimited JSON framing: sans-IO, bounded, and never crashing on junk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.httpclient import NEED_DATA, JsonLines, ProtocolError, parse_object


def test_split_anywhere() -> None:
    data = b'{"result":{"a":1}}\n\n{"result":{"b":2}}\n{"c"'
    for cut in range(len(data) + 1):
        p = JsonLines()
        p.receive_data(data[:cut])
        got = []
        while (ev := p.next_event()) is not NEED_DATA:
            got.append(ev)
        p.receive_data(data[cut:])
        while (ev := p.next_event()) is not NEED_DATA:
            got.append(ev)
        assert got == [{"result": {"a": 1}}, {"result": {"b": 2}}]


def test_finish_returns_unterminated_last_message() -> None:
    p = JsonLines()
    p.receive_data(b'{"x": 1}')
    assert p.next_event() is NEED_DATA
    assert p.finish() == {"x": 1}
    assert p.finish() is None


def test_bounded() -> None:
    p = JsonLines(max_message=100)
    p.receive_data(b"{" + b" " * 200)
    with pytest.raises(ProtocolError, match="100 byte bound"):
        p.next_event()


@pytest.mark.parametrize("line", [b"[1,2]", b"nope", b'{"a":', b"\xff\xfe"])
def test_malformed_lines(line: bytes) -> None:
    p = JsonLines()
    p.receive_data(line + b"\n")
    with pytest.raises(ProtocolError):
        p.next_event()


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=50))
def test_fuzz_never_crashes(data: bytes, step: int) -> None:
    p = JsonLines(max_message=512)
    try:
        for i in range(0, len(data), step):
            p.receive_data(data[i : i + step])
            while p.next_event() is not NEED_DATA:
                pass
        p.finish()
    except ProtocolError:
        pass


def test_parse_object() -> None:
    assert parse_object(b' {"a": [1]} ') == {"a": [1]}
    with pytest.raises(ProtocolError, match="expected a JSON object, got list"):
        parse_object(b"[]")
