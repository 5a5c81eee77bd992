"""The snapshot's disk cache: the raw store documents, so a restarted agent serves at once.

Format (msgpack map, version 1; see docs/snapshot.md):
    {"format": "nodeagent.snapshot.cache", "version": 1, "revision": int,
     "entries": [[key, value(bytes), create_revision, mod_revision, version], ...]}
Raw documents rather than a pickled snapshot: the cache stays valid across agent versions and is
rebuilt by the same code path as the store's own listing. Decoding is bounded and defensive; any
problem is a CacheError and the agent simply starts without the cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import msgpack

from nodeagent.snapshot.errors import CacheError
from nodeagent.store.base import KeyValue

FORMAT = "nodeagent.snapshot.cache"
VERSION = 1
MAX_CACHE_BYTES = 256 << 20


def encode(kvs: Iterable[KeyValue], revision: int) -> bytes:
    entries = [[kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version] for kv in kvs]
    data = {"format": FORMAT, "version": VERSION, "revision": revision, "entries": entries}
    return msgpack.packb(data, use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes, source: str = "cache") -> tuple[list[KeyValue], int]:
    """The documents and revision of a cache file's bytes; CacheError naming `source` if bad."""
    if len(data) > MAX_CACHE_BYTES:
        raise CacheError(f"{source}: {len(data)} bytes is over the {MAX_CACHE_BYTES} byte bound")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CacheError(f"{source}: not msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CacheError(f"{source}: not a snapshot cache (no format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise CacheError(f"{source}: cache version {doc.get('version')!r}, expected {VERSION}")
    revision = doc.get("revision")
    entries = doc.get("entries")
    if not isinstance(revision, int) or not isinstance(entries, list):
        raise CacheError(f"{source}: revision or entries missing")
    kvs = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, list)
            or len(entry) != 5
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], bytes)
            or not all(isinstance(n, int) for n in entry[2:])
        ):
            raise CacheError(f"{source}: entry {i} is not [key, value, create, mod, version]")
        kvs.append(KeyValue(entry[0], entry[1], entry[2], entry[3], entry[4]))
    return kvs, revision


def read(path: Path) -> bytes | None:
    """The cache file's bytes, or None when there is none (blocking: run it in a thread)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CACHE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CacheError(f"read {path}: {exc.strerror}") from None
    return data


def write(path: Path, data: bytes) -> None:
    """Replace the cache file atomically: a unique tmp file, fsync, rename (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
