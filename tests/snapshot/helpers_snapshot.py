"""Store key-values with increasing revisions for the snapshot tests (the documents themselves
come from tests/snapshot_docs.py)."""

from __future__ import annotations

from typing import Any

from snapshot_docs import key_of

from nodeagent.store import codec, keys
from nodeagent.store.base import Event, KeyValue


class Docs:
    """Builds KeyValues with increasing revisions, like a store would."""

    def __init__(self) -> None:
        self.revision = 0

    def kv(self, key: str, doc: Any) -> KeyValue:
        self.revision += 1
        value = doc if isinstance(doc, bytes) else codec.encode(doc)
        return KeyValue(key, value, self.revision, self.revision, 1)

    def put(self, key: str, doc: Any) -> Event:
        return Event("put", self.kv(key, doc))

    def delete(self, key: str) -> Event:
        self.revision += 1
        return Event("delete", KeyValue(key, b"", 0, self.revision, 0))

    def stored(self, doc: dict[str, Any]) -> KeyValue:
        """`doc` under its store key (snapshot_docs.key_of)."""
        return self.kv(key_of(doc), doc)

    def config(self, doc: dict[str, Any], namespace: str = "default") -> KeyValue:
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        return self.kv(keys.config(doc["kind"], meta["namespace"], meta["name"]), doc)
