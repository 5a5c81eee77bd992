"""The snapshot's disk cache format: a journal of store documents, so a restarted agent serves at
once (sans-IO encode/decode, plus the two file writes: atomic replace and checked append).

Format version 2 (see docs/snapshot.md), a stream of msgpack objects:

    {"format": "nodeagent.snapshot.cache", "version": 2}
    then, repeated:  change …  ["commit", revision, crc32]

A change is `[key, value (bytes) or nil for a deletion, create_revision, mod_revision, version]`;
a commit says the changes since the previous commit bring the documents to `revision`, and its
crc32 is that of their bytes. A full write (a listing) is the header, one change per document and
one commit; each later batch is appended as its changes and a commit. Reading folds the changes
in order and applies them at each commit whose checksum holds; whatever follows the last good
commit (an append cut short by a crash, a zero-filled tail) is dropped, which leaves the
documents exactly as of that commit, a state the store really had. Version 1 (one map: format,
version, revision, entries) is still read, so an upgraded agent keeps its cache.

Raw documents rather than a pickled snapshot: the cache stays valid across agent versions and is
rebuilt by the same code path as the store's own listing. Decoding is bounded and defensive; a
file that is not a cache at all is a CacheError and the agent simply starts without it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from nodeagent.snapshot.errors import CacheError
from nodeagent.store.base import Event, KeyValue

FORMAT = "nodeagent.snapshot.cache"
VERSION = 2
MAX_CACHE_BYTES = 256 << 20
_COMMIT = "commit"


@dataclass(frozen=True, slots=True)
class Cached:
    """What a cache file holds: the documents as of `revision`."""

    kvs: list[KeyValue]
    revision: int
    version: int  # the file's format version (1: read, but never appended to)
    end: int  # bytes up to the end of the last good commit
    dropped: str | None = None  # why the bytes after `end` were dropped, if there are any


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _change(event: Event) -> list[Any]:
    kv = event.kv
    value = kv.value if event.type == "put" else None
    return [kv.key, value, kv.create_revision, kv.mod_revision, kv.version]


def encode_changes(events: Iterable[Event], revision: int) -> bytes:
    """A batch of changes and its commit, to append to a cache file."""
    body = b"".join(_pack(_change(e)) for e in events)
    return body + _pack([_COMMIT, revision, zlib.crc32(body)])


def encode(kvs: Iterable[KeyValue], revision: int) -> bytes:
    """A whole cache file: the header and the documents `kvs` as of `revision`."""
    header = _pack({"format": FORMAT, "version": VERSION})
    return header + encode_changes((Event("put", kv) for kv in kvs), revision)


def decode(data: bytes, source: str = "cache") -> Cached:
    """The documents of a cache file's bytes; CacheError naming `source` if it is no cache."""
    if len(data) > MAX_CACHE_BYTES:
        raise CacheError(f"{source}: {len(data)} bytes is over the {MAX_CACHE_BYTES} byte bound")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data) or 1)
    unpacker.feed(data)
    try:
        header = unpacker.unpack()
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CacheError(f"{source}: not msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CacheError(f"{source}: not a snapshot cache (no format {FORMAT!r})")
    if header.get("version") == 1:
        return _decode_v1(header, unpacker.tell(), len(data), source)
    if header.get("version") != VERSION:
        raise CacheError(f"{source}: cache version {header.get('version')!r}, expected {VERSION}")
    documents: dict[str, KeyValue] = {}
    pending: list[tuple[str, KeyValue | None]] = []
    revision: int | None = None
    start = end = unpacker.tell()
    dropped = None
    while True:
        at = unpacker.tell()
        try:
            item = unpacker.unpack()
        except msgpack.OutOfData:
            if unpacker.tell() < len(data):
                dropped = "an incomplete record at the end"
            elif pending:
                dropped = "changes without their commit at the end"
            break
        except Exception as exc:
            dropped = f"undecodable bytes ({type(exc).__name__})"
            break
        change = _as_change(item)
        if change is not None:
            pending.append(change)
            continue
        if not (
            isinstance(item, list)
            and len(item) == 3
            and item[0] == _COMMIT
            and all(isinstance(n, int) for n in item[1:])
        ):
            dropped = "a record that is neither a change nor a commit"
            break
        if zlib.crc32(data[start:at]) != item[2]:
            dropped = f"a commit of revision {item[1]} whose checksum does not match"
            break
        for key, kv in pending:
            if kv is None:
                documents.pop(key, None)
            else:
                documents[key] = kv
        pending.clear()
        revision = item[1]
        start = end = unpacker.tell()
    if revision is None:
        raise CacheError(f"{source}: no complete commit ({dropped or 'empty'})")
    return Cached(list(documents.values()), revision, VERSION, end, dropped)


def _as_change(item: Any) -> tuple[str, KeyValue | None] | None:
    if not (
        isinstance(item, list)
        and len(item) == 5
        and isinstance(item[0], str)
        and (item[1] is None or isinstance(item[1], bytes))
        and all(isinstance(n, int) and not isinstance(n, bool) for n in item[2:])
    ):
        return None
    if item[1] is None:
        return item[0], None
    return item[0], KeyValue(item[0], item[1], item[2], item[3], item[4])


def _decode_v1(doc: dict[str, Any], end: int, size: int, source: str) -> Cached:
    """Version 1: one map with every document; read so that an upgrade keeps the cache."""
    revision = doc.get("revision")
    entries = doc.get("entries")
    if end != size or not isinstance(revision, int) or not isinstance(entries, list):
        raise CacheError(f"{source}: version 1 cache without revision and entries")
    kvs = []
    for i, entry in enumerate(entries):
        change = _as_change(entry)
        if change is None or change[1] is None:
            raise CacheError(f"{source}: entry {i} is not [key, value, create, mod, version]")
        kvs.append(change[1])
    return Cached(kvs, revision, 1, end)


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
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append(path: Path, data: bytes, size: int) -> None:
    """Append `data` to the cache file, which must be `size` bytes long (as last written), and
    fsync (blocking). OSError if it cannot; then the file is cut back to `size` if possible, and
    CacheError if it is not the file last written (changed by someone else, or cut back failed):
    it must be rewritten whole before anything is appended again."""
    fd = os.open(path, os.O_WRONLY)
    try:
        found = os.fstat(fd).st_size
        if found != size:
            raise CacheError(f"{path}: {found} bytes, {size} expected")
        try:
            os.lseek(fd, size, os.SEEK_SET)
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                raise CacheError(f"{path}: append failed ({exc.strerror}), not cut back") from exc
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
