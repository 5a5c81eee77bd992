"""The measured windows of a rollout: per subset figures of every analysed interval.

`meshctl ab report` and the live view read them; the controller appends one window per
analysis in the same transaction as the status. A msgpack map at
`/mesh/v1/rollout-windows/<ns>/<name>`: `{version: 1, host, windows: [{start, end,
subsets: {subset: {requests, failures, buckets: [[le, cumulative count], ...]}}}]}`, the last
MAX_WINDOWS (the windows are contiguous while one controller leads: each starts where the
previous ended).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nodeagent.rollout.metrics import Figures
from nodeagent.store import keys
from nodeagent.store.base import KeyValue, Put, Store
from nodeagent.store.codec import DecodeError, decode, encode

WINDOWS = keys.ROOT + "rollout-windows/"
MAX_WINDOWS = 600
VERSION = 1


def windows_key(namespace: str, name: str) -> str:
    return f"{WINDOWS}{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class Window:
    start: float
    end: float
    subsets: dict[str, Figures]

    def to_record(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "subsets": {k: v.to_record() for k, v in sorted(self.subsets.items())},
        }

    @classmethod
    def from_record(cls, record: Any) -> Window | None:
        if not isinstance(record, dict):
            return None
        start, end, subsets = record.get("start"), record.get("end"), record.get("subsets")
        if not isinstance(start, int | float) or not isinstance(end, int | float):
            return None
        if not isinstance(subsets, dict):
            return None
        figs = {str(k): Figures.from_record(v) for k, v in subsets.items() if isinstance(v, dict)}
        return cls(float(start), float(end), figs)


@dataclass(frozen=True, slots=True)
class Windows:
    namespace: str
    name: str
    host: str
    windows: tuple[Window, ...]
    mod_revision: int = 0

    def appended(self, window: Window) -> Windows:
        return Windows(
            self.namespace,
            self.name,
            self.host,
            (*self.windows, window)[-MAX_WINDOWS:],
            self.mod_revision,
        )

    def put(self) -> Put:
        record = {
            "version": VERSION,
            "host": self.host,
            "windows": [w.to_record() for w in self.windows],
        }
        return Put(windows_key(self.namespace, self.name), encode(record))

    def since(self, start: float) -> dict[str, Figures]:
        """Per subset, the sum of the windows that ended at or after `start`."""
        total: dict[str, Figures] = {}
        for w in self.windows:
            if w.end < start:
                continue
            for subset, fig in w.subsets.items():
                total.setdefault(subset, Figures()).add(fig)
        return total


def _from_kv(kv: KeyValue) -> Windows | None:
    namespace, _, name = kv.key.removeprefix(WINDOWS).partition("/")
    try:
        record = decode(kv)
    except DecodeError:
        return None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        return None
    items = record.get("windows")
    if not isinstance(items, list):
        items = []
    parsed = tuple(w for w in (Window.from_record(r) for r in items) if w is not None)
    host = record.get("host") if isinstance(record.get("host"), str) else ""
    return Windows(namespace, name, str(host), parsed, kv.mod_revision)


async def read_windows(store: Store, namespace: str, name: str, host: str) -> Windows:
    kv = await store.get(windows_key(namespace, name))
    found = _from_kv(kv) if kv is not None else None
    return found if found is not None else Windows(namespace, name, host, ())


async def list_windows(store: Store) -> list[Windows]:
    kvs, _ = await store.range(WINDOWS)
    return [w for w in (_from_kv(kv) for kv in kvs) if w is not None]
