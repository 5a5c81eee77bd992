"""Store values are msgpack maps; decoding failures name the key and never crash a reader."""

from __future__ import annotations

from typing import Any

import msgpack

from nodeagent.store.base import KeyValue, StoreError

MAX_VALUE = 1 << 20


class DecodeError(StoreError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"store value at {key!r} does not decode: {reason}")
        self.key = key


def encode(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def decode(kv: KeyValue) -> Any:
    if len(kv.value) > MAX_VALUE:
        raise DecodeError(kv.key, f"{len(kv.value)} bytes is over the {MAX_VALUE} byte bound")
    try:
        return msgpack.unpackb(kv.value, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(kv.key, f"{type(exc).__name__}: {exc}") from None
