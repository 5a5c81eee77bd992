"""The DNS wire format (RFC 1035, EDNS0 of RFC 6891), sans-IO and bounded.

What the in-pod DNS proxy needs and nothing more: parse any message (header, questions, resource
records with their rdata kept raw, name compression on read), build the few answers the proxy
gives itself (A and CNAME records, NOERROR/NXDOMAIN/SERVFAIL/FORMERR/NOTIMP, with name compression
on write), and frame messages for DNS over TCP (a 2-byte length prefix, `TcpFramer`).

Every bound is checked before it is relied on: a message is at most 65535 bytes, a label 63, a
name 255 on the wire; a compression pointer must point strictly before the previous one, so
pointer loops cannot exist; section counts are checked against the bytes left before looping.
Malformed input raises `MessageError` (with the message ID when the header was readable, so the
caller can answer FORMERR); nothing here raises anything else on bytes from outside.

Names are tuples of raw labels (`Name`), so a question is echoed byte for byte, case included
(clients using 0x20 randomisation compare it); `name_text` gives the lower-case dotted form the
resolver matches on.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from nodeagent.dns.errors import FramingError, MessageError

Name = tuple[bytes, ...]

# Record types and classes this module knows by name (any other is carried as a number).
TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED"}  # fmt: skip
TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
              33: "SRV", 41: "OPT", 65: "HTTPS", 255: "ANY"}  # fmt: skip

OPCODE_QUERY = 0

# Header flag bits (RFC 1035 4.1.1).
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_AD = 0x0020
FLAG_CD = 0x0010

HEADER_SIZE = 12
MAX_MESSAGE = 65535  # the TCP length prefix is 16 bits; a UDP payload cannot be larger either
MAX_UDP_PLAIN = 512  # a UDP answer without EDNS (RFC 1035 4.2.1)
# What we advertise and honour at most for UDP with EDNS: the DNS flag day 2020 value, which
# avoids IP fragmentation on every common path.
EDNS_UDP_SIZE = 1232
MAX_LABEL = 63
MAX_NAME = 255  # wire octets, length bytes and the root included
_MAX_POINTER_TARGET = 0x3FFF

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_Q_FIXED = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class Question:
    name: Name
    qtype: int
    qclass: int = CLASS_IN

    @property
    def text(self) -> str:
        return name_text(self.name)


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record; `rdata` is raw, `target` the decoded name of a CNAME/NS/PTR."""

    name: Name
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes
    target: Name | None = None

    @property
    def address(self) -> str | None:
        """The address of an A or AAAA record, else None."""
        if self.rtype == TYPE_A and len(self.rdata) == 4:
            return str(ipaddress.IPv4Address(self.rdata))
        if self.rtype == TYPE_AAAA and len(self.rdata) == 16:
            return str(ipaddress.IPv6Address(self.rdata))
        return None


@dataclass(frozen=True, slots=True)
class Edns:
    """The OPT pseudo-record of a message (RFC 6891 6.1.2)."""

    udp_size: int
    ext_rcode: int = 0
    version: int = 0
    dnssec_ok: bool = False
    options: bytes = b""


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authorities: tuple[Record, ...] = ()
    additionals: tuple[Record, ...] = field(default=())

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)

    @property
    def authoritative(self) -> bool:
        return bool(self.flags & FLAG_AA)

    @property
    def rcode(self) -> int:
        edns = self.edns
        return (self.flags & 0xF) | ((edns.ext_rcode << 4) if edns else 0)

    @property
    def edns(self) -> Edns | None:
        for rr in self.additionals:
            if rr.rtype == TYPE_OPT:
                return Edns(
                    udp_size=rr.rclass,
                    ext_rcode=rr.ttl >> 24,
                    version=(rr.ttl >> 16) & 0xFF,
                    dnssec_ok=bool(rr.ttl & 0x8000),
                    options=rr.rdata,
                )
        return None


# -- names -------------------------------------------------------------------------------------


def name_text(name: Name) -> str:
    """The lower-case dotted form of a name, without the trailing dot ("" for the root).

    Bytes that are not letters, digits, `-`, `_` or `*` are escaped as `\\DDD` (RFC 4343), so two
    different names never give the same text (a label containing a dot cannot pose as two).
    """
    return ".".join(_label_text(label) for label in name)


def _label_text(label: bytes) -> str:
    out = []
    for b in label.lower():
        c = chr(b)
        out.append(c if c.isascii() and (c.isalnum() or c in "-_*") else f"\\{b:03d}")
    return "".join(out)


def name_from_text(text: str) -> Name:
    """A name from dotted text (trailing dot optional), for building queries and answers."""
    text = text.rstrip(".")
    if not text:
        return ()
    labels = tuple(label.encode("ascii") for label in text.split("."))
    _check_name(labels)
    return labels


def _check_name(name: Name) -> None:
    size = 1
    for label in name:
        if not 0 < len(label) <= MAX_LABEL:
            raise ValueError(f"label of {len(label)} bytes (1-{MAX_LABEL} allowed) in {name!r}")
        size += 1 + len(label)
    if size > MAX_NAME:
        raise ValueError(f"name of {size} bytes on the wire (at most {MAX_NAME})")


# -- parsing -----------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, msg_id: int) -> None:
        self.data = data
        self.pos = HEADER_SIZE
        self.id = msg_id

    def fail(self, why: str) -> MessageError:
        return MessageError(f"malformed DNS message (id {self.id}) at byte {self.pos}: {why}",
                            id=self.id)  # fmt: skip

    def name(self) -> Name:
        data, pos = self.data, self.pos
        labels: list[bytes] = []
        size = 1
        resume: int | None = None  # where the record continues after the first pointer
        ceiling = pos  # every pointer must point strictly below the previous one: no loops
        while True:
            if pos >= len(data):
                raise self.fail("name runs past the end of the message")
            length = data[pos]
            kind = length & 0xC0
            if kind == 0xC0:
                if pos + 1 >= len(data):
                    raise self.fail("compression pointer cut short")
                target = ((length & 0x3F) << 8) | data[pos + 1]
                if target >= ceiling:
                    raise self.fail(f"compression pointer to {target} does not point backwards")
                if resume is None:
                    resume = pos + 2
                ceiling = pos = target
                continue
            if kind:
                raise self.fail(f"reserved label type {kind:#x}")
            if length == 0:
                pos += 1
                break
            size += 1 + length
            if size > MAX_NAME:
                raise self.fail(f"name longer than {MAX_NAME} bytes")
            end = pos + 1 + length
            if end > len(data):
                raise self.fail("label runs past the end of the message")
            labels.append(data[pos + 1 : end])
            pos = end
        self.pos = resume if resume is not None else pos
        return tuple(labels)

    def fixed(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        if self.pos + st.size > len(self.data):
            raise self.fail(f"{what} cut short")
        values = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return values

    def question(self) -> Question:
        name = self.name()
        qtype, qclass = self.fixed(_Q_FIXED, "question")
        return Question(name, qtype, qclass)

    def record(self) -> Record:
        name = self.name()
        rtype, rclass, ttl, rdlength = self.fixed(_RR_FIXED, "resource record")
        start, end = self.pos, self.pos + rdlength
        if end > len(self.data):
            raise self.fail(f"rdata of {rdlength} bytes runs past the end of the message")
        target = None
        if rtype in (TYPE_CNAME, TYPE_NS, TYPE_PTR):
            target = self.name()
            if self.pos != end:
                raise self.fail(f"{TYPE_NAMES[rtype]} rdata length {rdlength} does not match")
        if rtype == TYPE_OPT and name:
            raise self.fail("OPT record with a non-root owner name")
        self.pos = end
        return Record(name, rtype, rclass, ttl, self.data[start:end], target)

    def section(self, count: int, minimum: int, what: str) -> int:
        # Bound the loop by the bytes left before looping: a forged count costs nothing.
        if count * minimum > len(self.data) - self.pos:
            raise self.fail(f"{count} {what} cannot fit in the {len(self.data)}-byte message")
        return count


def parse_message(data: bytes, *, questions_only: bool = False) -> Message:
    """Parse one DNS message; `questions_only` stops after the question section.

    Raises MessageError (with `id` set once the header is readable) for anything malformed:
    truncation, bad compression, over-long names, counts that cannot fit, trailing bytes.
    """
    if len(data) < HEADER_SIZE:
        raise MessageError(f"DNS message of {len(data)} bytes is shorter than its 12-byte header")
    msg_id, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if len(data) > MAX_MESSAGE:
        raise MessageError(f"DNS message of {len(data)} bytes exceeds {MAX_MESSAGE}", id=msg_id)
    r = _Reader(data, msg_id)
    questions = tuple(r.question() for _ in range(r.section(qd, 5, "questions")))
    if questions_only:
        return Message(msg_id, flags, questions)
    sections = []
    for count, what in ((an, "answers"), (ns, "authority records"), (ar, "additional records")):
        sections.append(tuple(r.record() for _ in range(r.section(count, 11, what))))
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} trailing bytes after the last record")
    if sum(rr.rtype == TYPE_OPT for rr in sections[2]) > 1:
        raise r.fail("more than one OPT record")
    return Message(msg_id, flags, questions, sections[0], sections[1], sections[2])


# -- building ----------------------------------------------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.names: dict[Name, int] = {}  # name suffix → offset, for compression

    def name(self, name: Name) -> None:
        for i in range(len(name)):
            suffix = name[i:]
            offset = self.names.get(suffix)
            if offset is not None:
                self.buf += struct.pack("!H", 0xC000 | offset)
                return
            if len(self.buf) <= _MAX_POINTER_TARGET:
                self.names[suffix] = len(self.buf)
            self.buf.append(len(name[i]))
            self.buf += name[i]
        self.buf.append(0)

    def question(self, q: Question) -> None:
        self.name(q.name)
        self.buf += _Q_FIXED.pack(q.qtype, q.qclass)

    def record(self, rr: Record) -> None:
        self.name(rr.name)
        if rr.target is not None:
            # Write the target compressed; its length is known only afterwards.
            at = len(self.buf)
            self.buf += _RR_FIXED.pack(rr.rtype, rr.rclass, rr.ttl, 0)
            start = len(self.buf)
            self.name(rr.target)
            struct.pack_into("!H", self.buf, at + 8, len(self.buf) - start)
        else:
            self.buf += _RR_FIXED.pack(rr.rtype, rr.rclass, rr.ttl, len(rr.rdata))
            self.buf += rr.rdata


def encode_message(msg: Message) -> bytes:
    """The wire form of a message (names compressed). Raises ValueError on an invalid name."""
    for q in msg.questions:
        _check_name(q.name)
    for rr in (*msg.answers, *msg.authorities, *msg.additionals):
        _check_name(rr.name)
        if rr.target is not None:
            _check_name(rr.target)
    w = _Writer()
    w.buf += _HEADER.pack(msg.id, msg.flags, len(msg.questions), len(msg.answers),
                          len(msg.authorities), len(msg.additionals))  # fmt: skip
    for q in msg.questions:
        w.question(q)
    for rr in (*msg.answers, *msg.authorities, *msg.additionals):
        w.record(rr)
    if len(w.buf) > MAX_MESSAGE:
        raise ValueError(f"DNS message of {len(w.buf)} bytes exceeds {MAX_MESSAGE}")
    return bytes(w.buf)


def a_record(name: Name, address: str, ttl: int) -> Record:
    return Record(name, TYPE_A, CLASS_IN, ttl, ipaddress.IPv4Address(address).packed)


def cname_record(name: Name, target: Name, ttl: int) -> Record:
    return Record(name, TYPE_CNAME, CLASS_IN, ttl, b"", target)


def opt_record(udp_size: int = EDNS_UDP_SIZE, *, dnssec_ok: bool = False) -> Record:
    return Record((), TYPE_OPT, udp_size, 0x8000 if dnssec_ok else 0, b"")


def encode_query(
    name: str, qtype: int = TYPE_A, *, id: int = 0, edns_size: int | None = None
) -> bytes:
    """A recursive query for one name (for tests, health checks and tools)."""
    additionals = (opt_record(edns_size),) if edns_size is not None else ()
    return encode_message(
        Message(id, FLAG_RD, (Question(name_from_text(name), qtype),), additionals=additionals)
    )


def response_limit(query: Message, *, tcp: bool) -> int:
    """How large an answer to `query` may be: 65535 over TCP; over UDP 512, or the size the
    client's EDNS advertises (at least 512, at most what we advertise ourselves)."""
    if tcp:
        return MAX_MESSAGE
    edns = query.edns
    if edns is None:
        return MAX_UDP_PLAIN
    return max(MAX_UDP_PLAIN, min(edns.udp_size, EDNS_UDP_SIZE))


def build_response(
    query: Message,
    rcode: int,
    answers: tuple[Record, ...] = (),
    *,
    authoritative: bool = False,
    max_size: int = MAX_UDP_PLAIN,
) -> bytes:
    """Our answer to `query`: same ID, opcode, RD and CD, its (first) question echoed, RA set
    (we recurse by forwarding), an OPT record when the query had one. When the answer does not
    fit in `max_size` it goes out without records and with TC set, so the client retries over
    TCP (RFC 1035 4.2.1, RFC 7766)."""
    flags = FLAG_QR | (query.opcode << 11) | FLAG_RA | (rcode & 0xF)
    flags |= query.flags & (FLAG_RD | FLAG_CD)
    if authoritative:
        flags |= FLAG_AA
    additionals: tuple[Record, ...] = ()
    if query.edns is not None:
        additionals = (Record((), TYPE_OPT, EDNS_UDP_SIZE, (rcode >> 4) << 24, b""),)
    msg = Message(query.id, flags, query.questions[:1], answers, (), additionals)
    wire = encode_message(msg)
    if len(wire) > max_size and answers:
        msg = Message(query.id, flags | FLAG_TC, query.questions[:1], (), (), additionals)
        wire = encode_message(msg)
    return wire


def error_response(data: bytes, rcode: int) -> bytes | None:
    """A bare error answer (no question echoed) to bytes that did not parse, or None when no
    answer must be sent: too short for a header, or itself a response (answering those could
    loop two servers into a storm)."""
    if len(data) < HEADER_SIZE:
        return None
    msg_id, flags = struct.unpack_from("!HH", data)
    if flags & FLAG_QR:
        return None
    flags = FLAG_QR | (flags & (0xF << 11)) | (flags & FLAG_RD) | FLAG_RA | (rcode & 0xF)
    return _HEADER.pack(msg_id, flags, 0, 0, 0, 0)


# -- DNS over TCP framing ----------------------------------------------------------------------


class NeedData:
    """`TcpFramer.next_event()` needs more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class TcpFramer:
    """Splits a DNS-over-TCP byte stream into messages (RFC 1035 4.2.2): a 2-byte big-endian
    length, then the message. `receive_data(b)` then `next_event()` → bytes | NEED_DATA.

    Buffered bytes are bounded: at most one maximal message plus one read (`max_buffer`); the
    caller drains `next_event()` until NEED_DATA before it reads again. A zero length or a
    length over `max_message` is a FramingError: the connection cannot be resynchronised.
    """

    def __init__(self, *, max_message: int = MAX_MESSAGE, max_buffer: int | None = None) -> None:
        if not HEADER_SIZE <= max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message {max_message} not in {HEADER_SIZE}-{MAX_MESSAGE}")
        self.max_message = max_message
        self.max_buffer = max_buffer if max_buffer is not None else 2 * (2 + max_message)
        self._buf = bytearray()
        self.eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the stream; b"" means the peer closed its side."""
        if not data:
            self.eof = True
            return
        if len(self._buf) + len(data) > self.max_buffer:
            raise FramingError(
                f"DNS over TCP: more than {self.max_buffer} bytes buffered "
                "(the reader must drain next_event() between reads)"
            )
        self._buf += data

    def next_event(self) -> bytes | NeedData:
        if len(self._buf) < 2:
            return NEED_DATA
        length = int.from_bytes(self._buf[:2], "big")
        if length == 0 or length > self.max_message:
            raise FramingError(
                f"DNS over TCP: message length {length} (1-{self.max_message} allowed)"
            )
        if len(self._buf) < 2 + length:
            return NEED_DATA
        msg = bytes(self._buf[2 : 2 + length])
        del self._buf[: 2 + length]
        return msg

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @staticmethod
    def frame(message: bytes) -> bytes:
        if not 0 < len(message) <= MAX_MESSAGE:
            raise ValueError(f"DNS message of {len(message)} bytes cannot be framed")
        return len(message).to_bytes(2, "big") + message
