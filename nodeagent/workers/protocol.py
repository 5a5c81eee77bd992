"""The control ↔ worker channel's framing, sans-IO: a 4-byte big-endian length, then a msgpack map.

File descriptors travel beside the bytes (SCM_RIGHTS, attached by the sender to the first byte
of the frame that carries them); a frame says how many it carries (`"fds": n`), and the decoder
hands each frame the next `n` descriptors received, in order. Because the kernel delivers
ancillary data with the byte it was attached to, a complete frame's descriptors have always
arrived by the time the frame has.

`FrameDecoder.receive_data(data, fds)` then `next_message()` → `Message | None`; bounded: a
frame longer than `MAX_FRAME` or a body that is not a msgpack map is a `ProtocolError`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAX_FRAME = 256 * 1024 * 1024  # a full snapshot of a large mesh fits
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol (the channel is unusable)."""


@dataclass(slots=True)
class Message:
    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    @property
    def type(self) -> str:
        return str(self.body.get("t", ""))


def encode(body: dict[str, Any], *, fds: int = 0) -> bytes:
    """One frame; `fds` is how many descriptors the sender attaches to it."""
    if fds:
        body = {**body, "fds": fds}
    try:
        data: bytes = msgpack.packb(body, use_bin_type=True)
    except (TypeError, OverflowError, ValueError) as exc:
        raise ProtocolError(f"frame {body.get('t')!r} cannot be encoded: {exc}") from None
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(data)) + data


class FrameDecoder:
    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._max = max_frame

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def pending_fds(self) -> list[int]:
        """Descriptors received but not (yet) claimed by a frame: the caller closes them."""
        out = list(self._fds)
        self._fds.clear()
        return out

    def next_message(self) -> Message | None:
        if len(self._buf) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buf)
        if length > self._max:
            raise ProtocolError(f"frame of {length} bytes exceeds {self._max}")
        end = _HEADER.size + length
        if len(self._buf) < end:
            return None
        raw = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        try:
            body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"frame body is not msgpack: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"frame body is a {type(body).__name__}, not a map")
        n = body.pop("fds", 0)
        if not isinstance(n, int) or n < 0:
            raise ProtocolError(f"frame claims {n!r} descriptors")
        if n > len(self._fds):
            raise ProtocolError(f"frame claims {n} descriptors, {len(self._fds)} received")
        return Message(body, [self._fds.popleft() for _ in range(n)])
