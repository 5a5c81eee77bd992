"""The tunnel's header: what the client says after the TLS handshake, and the server's reply.

Sans-IO and bounded (docs/protocol.md): a frame is `b"MT"`, one version byte, a big-endian u16
body length, then a msgpack map. The version and the length are checked as soon as their bytes
arrive, so an unknown version or an oversized body is refused before it is buffered. Use
`HeaderParser(kind)`: `receive_data(buf)`, then `next_event()` → `TunnelRequest` /
`TunnelResponse` / `NEED_DATA`; bytes after the frame (the start of the stream) stay in
`trailing_data`. `encode_request` / `encode_response` build frames.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgpack

MAGIC: Final = b"MT"
VERSION: Final = 1
PREFIX_SIZE: Final = 5  # magic (2) + version (1) + body length (2)
MAX_BODY: Final = 8 * 1024  # a header carries a few names; anything larger is an attack or a bug
_MAX_TEXT = 1024
_MAX_TRACE_ITEMS = 16


class HeaderError(Exception):
    """A malformed, oversized or unknown-version frame: the connection must be closed."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Who the client says it is (informational: the server trusts only the certificate)."""

    namespace: str = ""
    name: str = ""
    identity: str = ""
    address: str = ""


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    port: int  # the destination workload's port the bytes are for
    source: SourceInfo = field(default_factory=SourceInfo)
    trace: dict[str, str] = field(default_factory=dict)  # e.g. {"traceparent": "00-…"}
    version: int = VERSION


# Status codes follow HTTP's meaning so operators read them at a glance.
OK: Final = 200
BAD_REQUEST: Final = 400
FORBIDDEN: Final = 403
BAD_GATEWAY: Final = 502
UNAVAILABLE: Final = 503


@dataclass(frozen=True, slots=True)
class TunnelResponse:
    code: int
    reason: str = ""
    version: int = VERSION

    @property
    def ok(self) -> bool:
        return self.code == OK


def _frame(body: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_BODY:
        raise HeaderError(f"tunnel header body is {len(data)} bytes, over the {MAX_BODY} limit")
    return MAGIC + struct.pack("!BH", VERSION, len(data)) + data


def encode_request(req: TunnelRequest) -> bytes:
    return _frame(
        {
            "port": req.port,
            "src": {
                "ns": req.source.namespace,
                "name": req.source.name,
                "id": req.source.identity,
                "ip": req.source.address,
            },
            "trace": dict(req.trace),
        }
    )


def encode_response(resp: TunnelResponse) -> bytes:
    return _frame({"code": resp.code, "reason": resp.reason[:_MAX_TEXT]})


class HeaderParser:
    """Parses exactly one frame of `kind` ("request" on the server, "response" on the client)."""

    def __init__(self, kind: Literal["request", "response"], *, max_body: int = MAX_BODY) -> None:
        self.kind = kind
        self.max_body = max_body
        self._buf = bytearray()
        self._event: TunnelRequest | TunnelResponse | None = None
        self.trailing_data = b""

    def receive_data(self, data: bytes) -> None:
        if self._event is not None:
            self.trailing_data += data
            return
        self._buf += data
        # Check the prefix as soon as its bytes are here, before buffering any body.
        self._check_prefix()

    def next_event(self) -> TunnelRequest | TunnelResponse | _NeedData:
        if self._event is not None:
            return self._event
        if len(self._buf) < PREFIX_SIZE:
            return NEED_DATA
        size = struct.unpack_from("!H", self._buf, 3)[0]
        if len(self._buf) < PREFIX_SIZE + size:
            return NEED_DATA
        body = bytes(self._buf[PREFIX_SIZE : PREFIX_SIZE + size])
        self.trailing_data = bytes(self._buf[PREFIX_SIZE + size :])
        self._buf.clear()
        self._event = self._decode(body)
        return self._event

    def _check_prefix(self) -> None:
        head = bytes(self._buf[: len(MAGIC)])
        if head != MAGIC[: len(head)]:
            raise HeaderError(f"tunnel {self.kind}: bad magic {head!r} (not a mesh tunnel header)")
        if len(self._buf) > 2 and self._buf[2] != VERSION:
            raise HeaderError(
                f"tunnel {self.kind}: unknown header version {self._buf[2]} "
                f"(this agent speaks {VERSION})"
            )
        if len(self._buf) >= PREFIX_SIZE:
            size = struct.unpack_from("!H", self._buf, 3)[0]
            if size > self.max_body:
                raise HeaderError(
                    f"tunnel {self.kind}: header body of {size} bytes is over the "
                    f"{self.max_body}-byte limit"
                )

    def _decode(self, body: bytes) -> TunnelRequest | TunnelResponse:
        try:
            doc = msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=True,
                max_str_len=self.max_body,
                max_bin_len=self.max_body,
                max_array_len=_MAX_TRACE_ITEMS,
                max_map_len=_MAX_TRACE_ITEMS,
            )
        except Exception as exc:  # msgpack raises a zoo of types for bad input
            raise HeaderError(f"tunnel {self.kind}: undecodable msgpack body: {exc}") from None
        if not isinstance(doc, dict):
            raise HeaderError(f"tunnel {self.kind}: body is {type(doc).__name__}, not a map")
        if self.kind == "request":
            return _request(doc)
        return _response(doc)


def _text(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise HeaderError(f"tunnel {where}: {key!r} must be a string of at most {_MAX_TEXT}")
    return value


def _int(doc: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HeaderError(f"tunnel {where}: {key!r} must be an integer in {low}..{high}")
    return value


def _request(doc: dict[str, Any]) -> TunnelRequest:
    port = _int(doc, "port", "request", 1, 65535)
    src = doc.get("src", {})
    if not isinstance(src, dict):
        raise HeaderError("tunnel request: 'src' must be a map")
    trace = doc.get("trace", {})
    if not isinstance(trace, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= _MAX_TEXT for k, v in trace.items()
    ):
        raise HeaderError("tunnel request: 'trace' must be a map of strings")
    return TunnelRequest(
        port=port,
        source=SourceInfo(
            namespace=_text(src, "ns", "request src"),
            name=_text(src, "name", "request src"),
            identity=_text(src, "id", "request src"),
            address=_text(src, "ip", "request src"),
        ),
        trace=dict(trace),
    )


def _response(doc: dict[str, Any]) -> TunnelResponse:
    return TunnelResponse(
        code=_int(doc, "code", "response", 100, 599), reason=_text(doc, "reason", "response")
    )
