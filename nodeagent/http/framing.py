"""Strict request framing, checked on the client's bytes before h11 parses them (sans-IO).

h11 is lenient where a proxy must not be: it takes a request with both `Content-Length` and
`Transfer-Encoding: chunked` (and frames it by the latter), unfolds obs-folded header lines,
accepts any `HTTP/x.y` version and bare-LF line ends, and waits forever on a bare-LF chunk line.
A proxy that is lenient where its upstream is strict (or the other way round) lets a client
smuggle a second request past routing and policy. So every byte the client sends goes through
`RequestFraming.feed` first, which follows the message boundaries itself and raises
`FramingError` (a `h11.RemoteProtocolError`: answered with its status and a closed connection)
on anything ambiguous:

- a request line whose version is not HTTP/1.0 or HTTP/1.1 (505), or malformed (400);
- a bare LF anywhere in a head, a chunk line or the trailers; an obs-folded header line (400);
- `Transfer-Encoding` together with `Content-Length`, more than one `Transfer-Encoding`, one on
  an HTTP/1.0 request, or one that is not exactly `chunked` (400; a coding list ending in
  `chunked` is 501, as h11 says, since no other coding is implemented);
- more than one `Content-Length` (even equal ones), or one that is not 1 to 18 digits (400);
- a chunk size that is not 1 to 16 hex digits (invalid or overflowing), a chunk line over 4 KiB,
  chunk data not followed by CRLF (400).

Upgrade and CONNECT requests end the checks for the connection (what follows is not HTTP, as
for h11's PAUSED). Memory is bounded by the head size limit.
"""

from __future__ import annotations

import re

import h11

MAX_CHUNK_LINE = 4096
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")

_HEAD, _CHUNK_LINE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _BODY, _PASSTHROUGH = range(7)


class FramingError(h11.RemoteProtocolError):
    """The client's message framing is malformed or ambiguous: answer `status` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason, status)


class RequestFraming:
    """Follows the message boundaries of the bytes one client sends; see the module doc."""

    def __init__(self, *, max_head_bytes: int) -> None:
        self._max_head = max_head_bytes
        self._state = _HEAD
        self._buf = bytearray()  # the head, chunk line or trailer line being read
        self._remaining = 0  # bytes of chunk data or Content-Length body still to come
        self._scanned = 0  # where the search for the end of the head resumes

    @property
    def passthrough(self) -> bool:
        """An Upgrade or CONNECT request ended the checks: what follows is not HTTP."""
        return self._state == _PASSTHROUGH

    def feed(self, data: bytes) -> None:
        """Check the next bytes from the client (in order); raises FramingError."""
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            state = self._state
            if state == _PASSTHROUGH:
                return
            if state in (_BODY, _CHUNK_DATA):
                take = min(self._remaining, n - i)
                self._remaining -= take
                i += take
                if self._remaining == 0:
                    self._state = _HEAD if state == _BODY else _CHUNK_CRLF
                continue
            if state == _CHUNK_CRLF:
                piece = view[i : i + 2 - len(self._buf)]
                self._buf += piece
                i += len(piece)
                if len(self._buf) == 2:
                    if self._buf != b"\r\n":
                        raise FramingError(400, "chunk data not followed by CRLF")
                    self._buf.clear()
                    self._state = _CHUNK_LINE
                continue
            if state == _HEAD and not self._buf:
                # Fast path: a whole head in this read is checked without a loop per line.
                end = data.find(b"\r\n\r\n", i)
                if end >= 0 and data[i : i + 2] != b"\r\n":
                    head = data[i : end + 4]
                    if head.count(b"\n") != head.count(b"\r\n"):
                        raise FramingError(400, "bare LF in the request (lines end with CRLF)")
                    if len(head) > self._max_head:
                        raise FramingError(431, "request head too large")
                    i = end + 4
                    self._head_complete(head)
                    continue
            # A line-oriented state: the head, a chunk line, a trailer line.
            end = data.find(b"\n", i)
            if end < 0:
                self._buf += view[i:]
                self._check_size()
                return
            self._buf += view[i : end + 1]
            i = end + 1
            self._check_size()
            self._line_complete()

    # -- states ---------------------------------------------------------------------------------

    def _check_size(self) -> None:
        if self._state == _HEAD:
            if len(self._buf) > self._max_head:
                raise FramingError(431, "request head too large")
        elif len(self._buf) > MAX_CHUNK_LINE:
            raise FramingError(400, "chunk or trailer line too long")

    def _line_complete(self) -> None:
        """`_buf` ends with LF: one more line of the current state."""
        buf = self._buf
        if len(buf) < 2 or buf[-2] != 0x0D:
            raise FramingError(400, "bare LF in the request (lines end with CRLF)")
        state = self._state
        if state == _HEAD:
            if buf == b"\r\n":
                buf.clear()  # an empty line before the request line is allowed (RFC 9112 §2.2)
                return
            if not buf.endswith(b"\r\n\r\n"):
                return  # the head continues
            head = bytes(buf)
            buf.clear()
            self._head_complete(head)
        elif state == _CHUNK_LINE:
            line = bytes(buf[:-2])
            buf.clear()
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise FramingError(400, f"invalid chunk size {size_text[:32]!r}")
            size = int(size_text, 16)
            if size == 0:
                self._state = _TRAILER
            else:
                self._remaining = size
                self._state = _CHUNK_DATA
        elif state == _TRAILER:
            line = bytes(buf)
            buf.clear()
            if line == b"\r\n":
                self._state = _HEAD
            elif line[:1] in (b" ", b"\t"):
                raise FramingError(400, "obs-folded trailer line")

    def _head_complete(self, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise FramingError(400, "malformed request line")
        version = _VERSION.fullmatch(parts[2])
        if version is None:
            raise FramingError(400, "malformed HTTP version")
        if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise FramingError(505, f"HTTP version {parts[2].decode('ascii')} is not supported")
        te: list[bytes] = []
        cl: list[bytes] = []
        upgrade = parts[0] == b"CONNECT"
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise FramingError(400, "obs-folded header line")
            name, sep, value = line.partition(b":")
            if not sep:
                raise FramingError(400, "header line without a colon")
            name = name.lower()
            value = value.strip(b" \t")
            if name == b"transfer-encoding":
                te.append(value)
            elif name == b"content-length":
                cl.append(value)
            elif name == b"upgrade":
                upgrade = True
        if te:
            if cl:
                raise FramingError(400, "both Transfer-Encoding and Content-Length")
            if len(te) > 1:
                raise FramingError(400, "more than one Transfer-Encoding header")
            if parts[2] == b"HTTP/1.0":
                raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
            codings = [c.strip(b" \t").lower() for c in te[0].split(b",")]
            if codings != [b"chunked"]:
                if len(codings) > 1 and codings[-1] == b"chunked" and all(codings[:-1]):
                    raise FramingError(501, "only Transfer-Encoding: chunked is implemented")
                raise FramingError(400, f"Transfer-Encoding {te[0][:32]!r} is not chunked")
            self._state = _PASSTHROUGH if upgrade else _CHUNK_LINE
            return
        if cl:
            if len(cl) > 1 or not _DIGITS.fullmatch(cl[0]):
                raise FramingError(400, "invalid or repeated Content-Length")
            length = int(cl[0])
            if length:
                self._remaining = length
                self._state = _PASSTHROUGH if upgrade else _BODY
                return
        self._state = _PASSTHROUGH if upgrade else _HEAD
