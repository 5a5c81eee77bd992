"""The DNS wire format: hand-written byte vectors, bounds, and hypothesis fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.dns.errors import FramingError, MessageError
from nodeagent.dns.message import (
    CLASS_IN,
    EDNS_UDP_SIZE,
    FLAG_AA,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    MAX_UDP_PLAIN,
    NEED_DATA,
    RCODE_FORMERR,
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_OPT,
    Message,
    Question,
    Record,
    TcpFramer,
    a_record,
    build_response,
    cname_record,
    encode_message,
    encode_query,
    error_response,
    name_from_text,
    name_text,
    parse_message,
    response_limit,
)

# `dig example.com A` as captured: ID 0x1234, RD, one question, EDNS with 1232 bytes.
DIG_QUERY = bytes.fromhex(
    "1234 0100 0001 0000 0000 0001"
    "07 6578616d706c65 03 636f6d 00 0001 0001"
    "00 0029 04d0 00000000 0000".replace(" ", "")
)


def header(msg_id: int, flags: int, qd: int = 0, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!6H", msg_id, flags, qd, an, ns, ar)


def test_parse_a_real_query() -> None:
    msg = parse_message(DIG_QUERY)
    assert msg.id == 0x1234
    assert not msg.is_response
    assert msg.flags & FLAG_RD
    assert msg.questions == (Question((b"example", b"com"), TYPE_A, CLASS_IN),)
    assert msg.edns is not None
    assert msg.edns.udp_size == 1232
    assert response_limit(msg, tcp=False) == 1232
    assert response_limit(msg, tcp=True) == 65535


def test_encode_query_is_byte_exact() -> None:
    assert encode_query("example.com", id=0x1234, edns_size=1232) == DIG_QUERY


def test_response_compresses_echoes_and_answers() -> None:
    query = parse_message(encode_query("Reviews.Default", id=7))
    name = query.questions[0].name
    fqdn = name_from_text("reviews.default.svc.cluster.local")
    wire = build_response(
        query,
        0,
        (cname_record(name, fqdn, 30), a_record(fqdn, "10.96.0.10", 30)),
        authoritative=True,
    )
    # Header: QR, AA, RD copied, RA; 1 question, 2 answers.
    assert wire[:12] == header(7, FLAG_QR | FLAG_AA | FLAG_RD | FLAG_RA, 1, 2)
    # The question is echoed with its case, and the CNAME owner is a pointer to it (0xc00c).
    assert wire[12:33] == b"\x07Reviews\x07Default\x00\x00\x01\x00\x01"
    assert wire[33:35] == b"\xc0\x0c"
    reply = parse_message(wire)
    assert reply.answers[0].rtype == TYPE_CNAME
    assert reply.answers[0].target == fqdn
    assert reply.answers[1].name == fqdn
    assert reply.answers[1].address == "10.96.0.10"
    assert reply.answers[1].ttl == 30
    assert reply.authoritative
    assert len(wire) < 12 + 17 + 2 * 60  # compression made it small


def test_response_to_edns_query_carries_opt() -> None:
    reply = parse_message(build_response(parse_message(DIG_QUERY), RCODE_NXDOMAIN))
    assert reply.rcode == RCODE_NXDOMAIN
    assert reply.edns is not None
    assert reply.edns.udp_size == EDNS_UDP_SIZE
    assert [r.rtype for r in reply.additionals] == [TYPE_OPT]


def test_too_big_for_udp_is_truncated() -> None:
    query = parse_message(encode_query("big.example", id=1))
    name = query.questions[0].name
    answers = tuple(a_record(name, f"10.0.{i // 256}.{i % 256}", 30) for i in range(100))
    wire = build_response(query, 0, answers, max_size=MAX_UDP_PLAIN)
    reply = parse_message(wire)
    assert reply.truncated
    assert reply.answers == ()
    assert len(wire) <= MAX_UDP_PLAIN
    full = parse_message(build_response(query, 0, answers, max_size=65535))
    assert len(full.answers) == 100
    assert not full.truncated


def test_error_response_to_garbage_after_a_header() -> None:
    data = header(0xBEEF, FLAG_RD | (2 << 11), 1) + b"\x3f"  # opcode 2, question cut short
    with pytest.raises(MessageError) as info:
        parse_message(data)
    assert info.value.id == 0xBEEF
    wire = error_response(data, RCODE_FORMERR)
    assert wire == header(0xBEEF, FLAG_QR | (2 << 11) | FLAG_RD | FLAG_RA | RCODE_FORMERR)
    assert error_response(b"\x00" * 11, RCODE_FORMERR) is None  # not even a header
    assert error_response(header(1, FLAG_QR), RCODE_FORMERR) is None  # never answer answers


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x12", "shorter than its 12-byte header"),
        (header(1, 0, 1) + b"\x09abcd", "label runs past the end"),
        (header(1, 0, 1) + b"\xc0\x0c\x00\x01\x00\x01", "does not point backwards"),
        # A pointer to itself one label later: the classic loop.
        (header(1, 0, 1) + b"\x01a\xc0\x0c\x00\x01\x00\x01", "does not point backwards"),
        (header(1, 0, 1) + b"\x80\x00\x00\x00\x00", "reserved label type"),
        (
            header(1, 0, 1)
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x00\x00\x01\x00\x01",
            "longer than 255",
        ),
        (header(1, 0, 65535), "cannot fit"),
        (
            header(1, 0, 0, 1) + b"\x00\x00\x01\x00\x01\x00\x00\x00\x1e\x00\x04\x0a",
            "runs past the end",
        ),
        (header(1, 0, 1) + b"\x00\x00\x01\x00\x01" + b"junk", "trailing bytes"),
        (header(1, 0, 1) + b"\x01a\x00\x00\x01", "question cut short"),
        (
            header(1, 0, 0, 0, 0, 2) + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2,
            "more than one OPT",
        ),
        (
            header(1, 0, 0, 0, 0, 1) + b"\x01a\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
            "non-root owner",
        ),
    ],
)
def test_malformed_messages_are_named(data: bytes, fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        parse_message(data)


def test_compression_pointer_backwards_is_followed() -> None:
    # Two questions, the second is "www" + pointer to the first ("example.com").
    data = (header(9, 0, 2) + b"\x07example\x03com\x00\x00\x01\x00\x01"
            + b"\x03www\xc0\x0c\x00\x1c\x00\x01")  # fmt: skip
    msg = parse_message(data)
    assert [name_text(q.name) for q in msg.questions] == ["example.com", "www.example.com"]
    assert msg.questions[1].qtype == TYPE_AAAA


def test_name_text_escapes_what_could_be_confused() -> None:
    assert name_text((b"a.b", b"c")) == "a\\046b.c"
    assert name_text((b"WWW", b"Example")) == "www.example"
    assert name_text(()) == ""
    with pytest.raises(ValueError, match="label of 64 bytes"):
        name_from_text("a" * 64 + ".com")


def test_tcp_framer_splits_and_reassembles() -> None:
    f = TcpFramer()
    stream = TcpFramer.frame(b"x" * 20) + TcpFramer.frame(b"y" * 13)
    f.receive_data(stream[:1])
    assert f.next_event() is NEED_DATA
    f.receive_data(stream[1:25])
    assert f.next_event() == b"x" * 20
    assert f.next_event() is NEED_DATA
    f.receive_data(stream[25:])
    assert f.next_event() == b"y" * 13
    assert f.next_event() is NEED_DATA
    f.receive_data(b"")
    assert f.eof


def test_tcp_framer_bounds() -> None:
    f = TcpFramer(max_message=100)
    f.receive_data(b"\x00\x65")  # 101
    with pytest.raises(FramingError, match="length 101"):
        f.next_event()
    f = TcpFramer()
    f.receive_data(b"\x00\x00")
    with pytest.raises(FramingError, match="length 0"):
        f.next_event()
    f = TcpFramer(max_message=100, max_buffer=300)
    f.receive_data(b"\x00" * 300)
    with pytest.raises(FramingError, match="more than 300 bytes buffered"):
        f.receive_data(b"\x00")


# -- property tests ----------------------------------------------------------------------------

labels = st.binary(min_size=1, max_size=20)
names = st.lists(labels, min_size=0, max_size=6).map(tuple)
records = st.one_of(
    st.builds(
        lambda n, a, t: a_record(n, a, t),
        names,
        st.ip_addresses(v=4).map(str),
        st.integers(0, 2**31),
    ),
    st.builds(lambda n, t: cname_record(n, t, 30), names, names),
    st.builds(lambda n, d: Record(n, 16, CLASS_IN, 5, d), names, st.binary(max_size=40)),
)
messages = st.builds(
    Message,
    id=st.integers(0, 65535),
    flags=st.integers(0, 65535),
    questions=st.lists(st.builds(Question, names, st.integers(0, 65535)), max_size=3).map(tuple),
    answers=st.lists(records, max_size=6).map(tuple),
    authorities=st.lists(records, max_size=2).map(tuple),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_encode_parse_round_trip(msg: Message) -> None:
    wire = encode_message(msg)
    back = parse_message(wire)
    assert back.id == msg.id
    assert back.flags == msg.flags
    assert back.questions == msg.questions
    assert [(r.name, r.rtype, r.ttl, r.target, r.address) for r in back.answers] == [
        (r.name, r.rtype, r.ttl, r.target, r.address) for r in msg.answers
    ]
    assert encode_message(back) == wire


@given(st.binary(max_size=600))
@settings(max_examples=1500, deadline=None)
def test_random_bytes_never_crash(data: bytes) -> None:
    error: MessageError | None = None
    try:
        parse_message(data)
    except MessageError as e:
        error = e
    if error is not None:
        assert (error.id is None) == (len(data) < 12)
    response = error_response(data, RCODE_FORMERR)
    assert response is None or len(response) == 12


@given(messages, st.data())
@settings(max_examples=500, deadline=None)
def test_mutated_messages_never_crash(msg: Message, data: st.DataObject) -> None:
    wire = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        if not wire:
            break
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    for candidate in (bytes(wire), bytes(wire[:cut])):
        with contextlib.suppress(MessageError):
            parse_message(candidate)


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
@settings(max_examples=200, deadline=None)
def test_framer_reassembles_any_split(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(TcpFramer.frame(m) for m in frames)
    f = TcpFramer()
    got: list[bytes] = []
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(1, 64))
        f.receive_data(stream[pos : pos + step])
        pos += step
        while (event := f.next_event()) is not NEED_DATA:
            assert isinstance(event, bytes)
            got.append(event)
    assert got == frames
    assert f.buffered == 0


def test_truncated_flag_round_trips() -> None:
    query = parse_message(encode_query("a.b", id=3))
    reply = parse_message(build_response(query, 0, (), max_size=512))
    assert not reply.truncated
    assert not reply.flags & FLAG_TC
