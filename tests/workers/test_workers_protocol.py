"""The control ↔ worker framing (sans-IO): frames split anywhere, descriptors matched to the
frame that claims them, bounded and refusing garbage."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.workers.protocol import FrameDecoder, ProtocolError, encode


def test_round_trip_split_byte_by_byte() -> None:
    data = encode({"t": "a", "n": 1}) + encode({"t": "b", "blob": b"\x00" * 5})
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        while (msg := dec.next_message()) is not None:
            got.append(msg.body)
    assert got == [{"t": "a", "n": 1}, {"t": "b", "blob": b"\x00" * 5}]


def test_descriptors_go_to_the_frame_that_claims_them() -> None:
    dec = FrameDecoder()
    first = encode({"t": "plain"})
    second = encode({"t": "pod_add"}, fds=2)
    dec.receive_data(first + second[:3], fds=[7, 8])  # fds ride on the second frame's 1st byte
    m1 = dec.next_message()
    assert m1 is not None
    assert m1.type == "plain"
    assert m1.fds == []
    assert dec.next_message() is None
    dec.receive_data(second[3:])
    m2 = dec.next_message()
    assert m2 is not None
    assert m2.type == "pod_add"
    assert m2.fds == [7, 8]
    assert "fds" not in m2.body


def test_frame_claiming_missing_descriptors_is_refused() -> None:
    dec = FrameDecoder()
    dec.receive_data(encode({"t": "pod_add"}, fds=4), fds=[3])
    with pytest.raises(ProtocolError, match="claims 4 descriptors, 1 received"):
        dec.next_message()


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    dec = FrameDecoder(max_frame=100)
    dec.receive_data(struct.pack(">I", 101))
    with pytest.raises(ProtocolError, match="exceeds 100"):
        dec.next_message()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (msgpack.packb([1, 2]), "not a map"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb({"t": "x", "fds": -1}), "claims -1"),
    ],
)
def test_garbage_is_a_protocol_error(body: bytes, error: str) -> None:
    dec = FrameDecoder()
    dec.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match=error):
        dec.next_message()


def test_unencodable_body_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="'x' cannot be encoded"):
        encode({"t": "x", "n": 2**64})


def test_unclaimed_descriptors_are_handed_back() -> None:
    dec = FrameDecoder()
    dec.receive_data(b"\x00", fds=[9, 10])
    assert dec.pending_fds() == [9, 10]
    assert dec.pending_fds() == []


INT64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack encodes


@given(
    st.lists(st.dictionaries(st.text(max_size=5), INT64, max_size=4), max_size=6),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20),
)
def test_any_split_yields_the_same_messages(bodies: list[dict[str, int]], cuts: list[int]) -> None:
    data = b"".join(encode({"t": "m", "d": b}) for b in bodies)
    dec = FrameDecoder()
    got, pos, i = [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        dec.receive_data(data[pos : pos + step])
        pos, i = pos + step, i + 1
        while (msg := dec.next_message()) is not None:
            got.append(msg.body["d"])
    assert got == bodies
