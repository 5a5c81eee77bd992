"""The CNI socket framing and messages, and the plugin's own copy of the framing against ours."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.cni.errors import ErrorCode
from nodeagent.cni.protocol import (
    CLOSED,
    MAX_MESSAGE_SIZE,
    NEED_DATA,
    CniReply,
    CniRequest,
    Command,
    FrameDecoder,
    PodRef,
    ProtocolError,
    encode_frame,
)

PLUGIN = Path(__file__).resolve().parents[2] / "cni-plugin" / "mesh-cni"


def load_plugin() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("mesh_cni_plugin", str(PLUGIN))
    spec = importlib.util.spec_from_loader("mesh_cni_plugin", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


REQUEST = CniRequest(
    command=Command.ADD,
    container_id="c0ffee",
    netns="/var/run/netns/pod-1",
    ifname="eth0",
    pod=PodRef("default", "web-0", "uid-1"),
    args={"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0", "IgnoreUnknown": "1"},
    prev_result={"cniVersion": "1.1.0", "ips": [{"address": "10.1.0.5/24", "interface": 0}]},
    config={"cniVersion": "1.1.0", "name": "net", "type": "mesh-cni"},
)


def decode_all(decoder: FrameDecoder) -> list[Any]:
    events = []
    for _ in range(100):
        ev = decoder.next_event()
        events.append(ev)
        if ev is NEED_DATA or ev is CLOSED:
            return events
    raise AssertionError("decoder never asked for more data")


def test_request_round_trip_byte_by_byte() -> None:
    data = encode_frame(REQUEST.to_message())
    decoder = FrameDecoder()
    for i in range(len(data) - 1):
        decoder.receive_data(data[i : i + 1])
        assert decoder.next_event() is NEED_DATA
    decoder.receive_data(data[-1:])
    msg = decoder.next_event()
    assert isinstance(msg, dict)
    assert CniRequest.from_message(msg) == REQUEST
    decoder.receive_data(b"")
    assert decoder.next_event() is CLOSED


def test_reply_round_trip() -> None:
    for reply in (CniReply.success(skipped=True), CniReply.failure(11, "later", "why")):
        decoder = FrameDecoder()
        decoder.receive_data(encode_frame(reply.to_message()))
        msg = decoder.next_event()
        assert isinstance(msg, dict)
        assert CniReply.from_message(msg) == reply


def test_two_frames_in_one_buffer() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame({"v": 1, "n": 1}) + encode_frame({"v": 1, "n": 2}))
    assert decode_all(decoder) == [{"v": 1, "n": 1}, {"v": 1, "n": 2}, NEED_DATA]


def test_oversized_header_rejected_before_buffering() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", MAX_MESSAGE_SIZE + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next_event()
    # The error sticks: the connection is done.
    with pytest.raises(ProtocolError):
        decoder.next_event()


def test_buffer_bounded_even_without_asking_for_events() -> None:
    decoder = FrameDecoder(max_size=100)
    for _ in range(10):
        decoder.receive_data(b"\x00" * 64)
    with pytest.raises(ProtocolError, match="buffered"):
        decoder.next_event()


def test_encode_refuses_oversized() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame({"v": 1, "blob": "x" * MAX_MESSAGE_SIZE})


@pytest.mark.parametrize(
    ("data", "match", "code"),
    [
        (frame(b"\xc1"), "undecodable", ErrorCode.DECODE),
        (frame(msgpack.packb([1, 2])), "expected a map", ErrorCode.DECODE),
        (frame(msgpack.packb({"v": 2})), "version 2", ErrorCode.INCOMPATIBLE_VERSION),
        (frame(msgpack.packb({"cmd": "ADD"})), "version None", ErrorCode.INCOMPATIBLE_VERSION),
        (frame(msgpack.packb({1: 2})), "undecodable", ErrorCode.DECODE),
        (frame(msgpack.packb({"v": 1}) + b"x"), "undecodable", ErrorCode.DECODE),
        (frame(b"\x91" * 100_000 + b"\xc0"), "nested too deeply", ErrorCode.DECODE),
    ],
)
def test_bad_frames(data: bytes, match: str, code: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    with pytest.raises(ProtocolError, match=match) as info:
        decoder.next_event()
    assert info.value.code == code


def test_eof_inside_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame({"v": 1})[:-1])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed after"):
        decoder.next_event()


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"cmd": "FROB"}, "unknown command"),
        ({"cmd": None}, "unknown command"),
        ({"containerId": 5}, "'containerId' must be a string"),
        ({"pod": ["x"]}, "'pod' must be a map"),
        ({"pod": {"namespace": 1}}, "'namespace' must be a string"),
        ({"args": {"A": 1}}, "'args'"),
        ({"prevResult": [1]}, "'prevResult' must be a map"),
        ({"prevResult": {"b": b"\x00"}}, "JSON cannot carry"),
        ({"prevResult": {"mtu": float("nan")}}, "holds nan, which JSON cannot carry"),
        ({"config": {"x": [float("-inf")]}}, "holds -inf, which JSON cannot carry"),
        ({"config": {"a": {1: 2}}}, "must be a map|non-string key"),
        ({"validAttachments": [{"ifname": "eth0"}]}, "validAttachments"),
    ],
)
def test_request_field_checks(patch: dict[str, Any], match: str) -> None:
    msg = REQUEST.to_message() | patch
    with pytest.raises(ProtocolError, match=match):
        CniRequest.from_message(msg)


def test_reply_field_checks() -> None:
    with pytest.raises(ProtocolError, match="'ok'"):
        CniReply.from_message({"v": 1, "ok": 1})
    with pytest.raises(ProtocolError, match="'code'"):
        CniReply.from_message({"v": 1, "ok": False, "code": True})


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8), eof=st.booleans())
def test_fuzz_decoder_only_raises_protocol_error(chunks: list[bytes], eof: bool) -> None:
    decoder = FrameDecoder(max_size=256)
    for chunk in [*chunks, b""] if eof else chunks:
        decoder.receive_data(chunk)
        try:
            events = decode_all(decoder)
        except ProtocolError:
            return
        for ev in events:
            if isinstance(ev, dict):
                with contextlib.suppress(ProtocolError):
                    CniRequest.from_message(ev)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(list(REQUEST.to_message())), msgpack_values))
def test_fuzz_request_fields_only_raise_protocol_error(body: dict[str, Any]) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame({**body, "v": 1}))
    msg = decoder.next_event()
    assert isinstance(msg, dict)
    try:
        req = CniRequest.from_message(msg)
    except ProtocolError:
        return
    assert CniRequest.from_message(req.to_message()) == req


# --- the plugin's framing against ours --------------------------------------------------------


def test_plugin_reply_check_accepts_our_replies() -> None:
    plugin = load_plugin()
    for reply in (CniReply.success(), CniReply.failure(100, "no", "details")):
        raw = encode_frame(reply.to_message())
        (length,) = struct.unpack(">I", raw[:4])
        decoded = msgpack.unpackb(raw[4 : 4 + length], raw=False)
        assert plugin.check_reply(decoded)["ok"] is reply.ok
    with pytest.raises(plugin.AgentProtocolError, match="version"):
        plugin.check_reply({"v": 2, "ok": True})


def test_plugin_limits_match_ours() -> None:
    plugin = load_plugin()
    assert plugin.MAX_MESSAGE == MAX_MESSAGE_SIZE
    assert plugin.PROTOCOL_VERSION == 1
    assert set(plugin.COMMANDS) == {*Command, "VERSION"}


def test_plugin_cni_args_parser() -> None:
    plugin = load_plugin()
    assert plugin.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a=b;;") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "a=b",
    }
    with pytest.raises(plugin.CniError) as info:
        plugin.parse_cni_args("novalue")
    assert info.value.code == 4
