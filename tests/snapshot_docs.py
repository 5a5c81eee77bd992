"""Build a real `Snapshot` from test documents, the way the agent does from the store."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nodeagent.snapshot import Snapshot, SnapshotBuilder
from nodeagent.store import codec, keys
from nodeagent.store.base import KeyValue

Doc = dict[str, Any]


def key_of(doc: Doc) -> str:
    """The store key of a document: Workloads live under their node, the rest under their kind
    (namespace `default` when the document names none)."""
    meta = doc.setdefault("metadata", {})
    if doc["kind"] == "Workload":
        return keys.workload(doc["spec"]["node"], meta["uid"])
    return keys.config(doc["kind"], meta.setdefault("namespace", "default"), meta["name"])


def snapshot_of(docs: Iterable[Doc | tuple[str, Doc]], **options: Any) -> Snapshot:
    """A snapshot of `docs` (documents, or (key, document) pairs), one revision each; fails the
    test if the builder skipped any (a test document that does not convert is a test bug)."""
    pairs = [d if isinstance(d, tuple) else (key_of(d), d) for d in docs]
    kvs = [KeyValue(k, codec.encode(d), i, i, 1) for i, (k, d) in enumerate(pairs, start=1)]
    builder = SnapshotBuilder.build(kvs, len(kvs), **options)
    assert not builder.skipped(), f"documents skipped: {dict(builder.skipped())}"
    return builder.snapshot
