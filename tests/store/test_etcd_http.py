"""The etcd gateway's JSON-lines framing: sans-IO, bounded, and never crashing on junk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.store.base import StoreError
from nodeagent.store.etcd import _Parse, range_end
from nodeagent.store.etcd_http import NEED_DATA, JsonLines, ProtocolError


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


def test_parse_rejects_bad_fields() -> None:
    p = _Parse("etcd http://h:1/v3/kv/range")
    with pytest.raises(StoreError, match=r"h:1.*not valid base64"):
        p.kv({"key": "***"})
    with pytest.raises(StoreError, match="not an integer"):
        p.kv({"key": "YQ==", "mod_revision": "x"})
    with pytest.raises(StoreError, match="not a list"):
        p.objects({"kvs": "no"}, "kvs")
    with pytest.raises(StoreError, match=r"header\.revision"):
        p.revision({})
    kv = p.kv({"key": "YQ==", "value": "Yg==", "mod_revision": "7", "create_revision": 3})
    assert (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version) == (
        "a",
        b"b",
        7,
        3,
        0,
    )


def test_range_end() -> None:
    assert range_end("/a/") == b"/a0"
    assert range_end("") == b"\0"
    assert range_end("a\xff") == "a\xff".encode()[:-1] + b"\xc0"
