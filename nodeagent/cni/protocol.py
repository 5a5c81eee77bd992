"""The CNI socket's wire protocol (version 1): framing, the request and the reply.

One request and one reply per unix-socket connection, each a frame: a 4-byte big-endian
length, then that many bytes of a msgpack map carrying `"v": 1`. Frames are at most 1 MiB.
`FrameDecoder` is sans-IO (`receive_data(buf)`, then `next_event()` → message | NEED_DATA |
CLOSED) and bounded, so a malformed or oversized frame is a `ProtocolError` for that
connection only. `CniRequest` / `CniReply` check every field they take off the wire.

The plugin (cni-plugin/mesh-cni) carries its own copy of the framing so that it starts without
importing the agent; tests run both against each other. Spec of record: docs/cni.md.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto
from typing import Any, Literal

import msgpack

from nodeagent.cni.errors import EnrollError, ErrorCode, ProtocolError

__all__ = [
    "CLOSED",
    "MAX_MESSAGE_SIZE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "CniReply",
    "CniRequest",
    "Command",
    "EnrollError",
    "ErrorCode",
    "FrameDecoder",
    "PodRef",
    "ProtocolError",
    "encode_frame",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_SIZE = 1 << 20
_HEADER = struct.Struct(">I")
# JSON-like payloads (config, prevResult) deeper than this are not a network config.
_MAX_DEPTH = 32


class Sentinel(Enum):
    NEED_DATA = auto()
    CLOSED = auto()


NEED_DATA: Literal[Sentinel.NEED_DATA] = Sentinel.NEED_DATA
CLOSED: Literal[Sentinel.CLOSED] = Sentinel.CLOSED


class Command(StrEnum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    STATUS = "STATUS"
    GC = "GC"


def encode_frame(message: Mapping[str, Any], *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    payload: bytes = msgpack.packb(dict(message), use_bin_type=True)
    if len(payload) > max_size:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {max_size}-byte limit")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Sans-IO decoder of length-prefixed msgpack maps with `"v": PROTOCOL_VERSION`.

    Feed bytes with `receive_data` (b"" = the peer closed); `next_event` returns a message
    dict, NEED_DATA, or CLOSED (clean end between frames) and raises `ProtocolError` for
    anything else. Memory is bounded by one frame: at most 4 + max_size bytes are buffered.
    """

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max_size = max_size
        self._buf = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            self._error = ProtocolError("data received after end of stream")
            return
        self._buf += data
        if len(self._buf) > _HEADER.size + self._max_size:
            self._error = ProtocolError(
                f"more than {self._max_size} bytes buffered without a complete frame"
            )
            self._buf.clear()

    def next_event(self) -> dict[str, Any] | Sentinel:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _next(self) -> dict[str, Any] | Sentinel:
        if len(self._buf) < _HEADER.size:
            if not self._eof:
                return NEED_DATA
            if self._buf:
                raise ProtocolError("connection closed inside a frame header")
            return CLOSED
        (length,) = _HEADER.unpack_from(self._buf)
        if length > self._max_size:
            raise ProtocolError(f"frame of {length} bytes exceeds the {self._max_size}-byte limit")
        end = _HEADER.size + length
        if len(self._buf) < end:
            if self._eof:
                raise ProtocolError(
                    f"connection closed after {len(self._buf) - _HEADER.size} of {length} bytes"
                )
            return NEED_DATA
        payload = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        return _decode_message(payload)


def _decode_message(payload: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except msgpack.StackError:
        # msgpack's own bound on nesting (its message is empty): name the problem.
        raise ProtocolError("undecodable msgpack: nested too deeply") from None
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message is a msgpack {type(message).__name__}, expected a map")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} not supported (this agent speaks {PROTOCOL_VERSION})",
            code=ErrorCode.INCOMPATIBLE_VERSION,
        )
    return message


# --- field checks -----------------------------------------------------------------------------


def _field_error(name: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError(f"field {name!r} must be {expected}, got {type(value).__name__}")


def _str(msg: Mapping[str, Any], name: str) -> str:
    value = msg.get(name, "")
    if not isinstance(value, str):
        raise _field_error(name, "a string", value)
    return value


def _json_like(value: object, where: str, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"{where} nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            # msgpack carries NaN and Infinity; JSON (the runtime's side) cannot.
            raise ProtocolError(f"{where} holds {value!r}, which JSON cannot carry")
        return
    if isinstance(value, list):
        for item in value:
            _json_like(item, where, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{where} has a non-string key {key!r}")
            _json_like(item, where, depth + 1)
        return
    raise ProtocolError(f"{where} holds a {type(value).__name__}, which JSON cannot carry")


def _json_object(msg: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = msg.get(name)
    if not isinstance(value, dict):
        raise _field_error(name, "a map", value)
    _json_like(value, repr(name))
    return value


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class CniRequest:
    """One CNI call as the plugin forwards it (see docs/cni.md for each field's meaning)."""

    command: Command
    container_id: str
    netns: str
    ifname: str
    pod: PodRef
    args: dict[str, str] = field(default_factory=dict)
    prev_result: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # GC only: the attachments the runtime still uses, as CNI spells them
    # ({"containerID": ..., "ifname": ...}); everything else may be collected.
    valid_attachments: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> CniRequest:
        raw_cmd = msg.get("cmd")
        try:
            command = Command(raw_cmd if isinstance(raw_cmd, str) else "")
        except ValueError:
            raise ProtocolError(
                f"unknown command {raw_cmd!r}; expected one of {', '.join(Command)}"
            ) from None
        pod = msg.get("pod") or {}
        if not isinstance(pod, dict):
            raise _field_error("pod", "a map", pod)
        args = msg.get("args") or {}
        if not isinstance(args, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in args.items()
        ):
            raise ProtocolError("field 'args' must be a map of strings to strings")
        prev = msg.get("prevResult")
        prev_result = None if prev is None else _json_object(msg, "prevResult")
        config = _json_object(msg, "config") if msg.get("config") is not None else {}
        attachments = msg.get("validAttachments") or []
        if not isinstance(attachments, list) or not all(
            isinstance(a, dict)
            and isinstance(a.get("containerID"), str)
            and isinstance(a.get("ifname", ""), str)
            for a in attachments
        ):
            raise ProtocolError(
                "field 'validAttachments' must be a list of {containerID, ifname} maps"
            )
        return cls(
            command=command,
            container_id=_str(msg, "containerId"),
            netns=_str(msg, "netns"),
            ifname=_str(msg, "ifname"),
            pod=PodRef(
                namespace=_str(pod, "namespace"), name=_str(pod, "name"), uid=_str(pod, "uid")
            ),
            args=dict(args),
            prev_result=prev_result,
            config=config,
            valid_attachments=[
                {"containerID": a["containerID"], "ifname": a.get("ifname", "")}
                for a in attachments
            ],
        )

    def to_message(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "cmd": str(self.command),
            "containerId": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "pod": {"namespace": self.pod.namespace, "name": self.pod.name, "uid": self.pod.uid},
            "args": dict(self.args),
            "prevResult": self.prev_result,
            "config": self.config,
            "validAttachments": list(self.valid_attachments),
        }


@dataclass(frozen=True, slots=True)
class CniReply:
    ok: bool
    code: int = 0
    msg: str = ""
    details: str = ""
    # ADD only: the agent chose not to enroll the pod (opted out); the pod starts unmeshed.
    skipped: bool = False

    @classmethod
    def success(cls, *, skipped: bool = False) -> CniReply:
        return cls(ok=True, skipped=skipped)

    @classmethod
    def failure(cls, code: int, msg: str, details: str = "") -> CniReply:
        return cls(ok=False, code=int(code), msg=msg, details=details)

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> CniReply:
        ok, code, skipped = msg.get("ok"), msg.get("code", 0), msg.get("skipped", False)
        if not isinstance(ok, bool):
            raise _field_error("ok", "a boolean", ok)
        if isinstance(code, bool) or not isinstance(code, int):
            raise _field_error("code", "an integer", code)
        if not isinstance(skipped, bool):
            raise _field_error("skipped", "a boolean", skipped)
        return cls(
            ok=ok, code=code, msg=_str(msg, "msg"), details=_str(msg, "details"), skipped=skipped
        )

    def to_message(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "ok": self.ok,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
            "skipped": self.skipped,
        }
