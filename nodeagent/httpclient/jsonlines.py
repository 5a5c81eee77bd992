"""Newline-delimited JSON objects (etcd's watch stream, Kubernetes watch events), sans-IO.

`JsonLines`: `receive_data(bytes)` then `next_event()` → a JSON object or NEED_DATA, with a
bound on each message so that a peer that never sends a newline cannot grow memory without end.
"""

from __future__ import annotations

import json
from typing import Any

from nodeagent.httpclient.errors import ProtocolError

MAX_MESSAGE = 16 << 20
NEED_DATA = None


class JsonLines:
    """Sans-IO: `receive_data(bytes)` then `next_event()` → a JSON object or NEED_DATA."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._scanned = 0

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> dict[str, Any] | None:
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                # remember how far we looked so a message arriving in small pieces is scanned once
                self._scanned = len(self._buf)
                if len(self._buf) > self._max:
                    raise ProtocolError(f"a JSON message is over the {self._max} byte bound")
                return NEED_DATA
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            self._scanned = 0
            if len(line) > self._max:
                raise ProtocolError(f"a JSON message is over the {self._max} byte bound")
            if line.strip():
                return parse_object(line)

    def finish(self) -> dict[str, Any] | None:
        """At end of stream: a last message not followed by a newline, if any."""
        rest = bytes(self._buf).strip()
        self._buf.clear()
        self._scanned = 0
        return parse_object(rest) if rest else None


def parse_object(raw: bytes) -> dict[str, Any]:
    """One JSON object (anything else, or malformed JSON, is a ProtocolError)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    return obj
