"""Checks shared by the embedded backends (memory, sqlite) so they reject what etcd rejects.

etcd refuses a transaction branch that writes one key twice or puts a key that a delete of the
same branch also covers; the embedded backends refuse the same branches with the same meaning,
so a caller that passes its tests on memory:// does not fail on etcd://.
"""

from __future__ import annotations

from collections.abc import Sequence

from nodeagent.store.base import Delete, KeyValue, Op, Put, StoreError
from nodeagent.store.codec import MAX_VALUE

MAX_KEY = 4096
MAX_OPS = 128


def check_key(backend: str, key: str) -> None:
    if not key:
        raise StoreError(f"{backend}: empty key")
    if len(key.encode()) > MAX_KEY:
        raise StoreError(f"{backend}: key {key[:64]!r}… is over the {MAX_KEY} byte bound")


def covers(delete: Delete, key: str) -> bool:
    return key.startswith(delete.key) if delete.prefix else key == delete.key


def check_ops(backend: str, ops: Sequence[Op]) -> None:
    """Raise StoreError for a branch etcd would refuse (duplicate or overlapping writes)."""
    if len(ops) > MAX_OPS:
        raise StoreError(f"{backend}: txn has {len(ops)} operations, over the {MAX_OPS} bound")
    puts: set[str] = set()
    deletes: list[Delete] = []
    for op in ops:
        if isinstance(op, Put) or not op.prefix:
            check_key(backend, op.key)
        if isinstance(op, Put):
            check_value(backend, op.key, op.value)
            if op.key in puts:
                raise StoreError(f"{backend}: txn puts {op.key!r} twice")
            puts.add(op.key)
        else:
            deletes.append(op)
    for d in deletes:
        for key in puts:
            if covers(d, key):
                raise StoreError(f"{backend}: txn both puts and deletes {key!r}")


def check_value(backend: str, key: str, value: bytes) -> None:
    if len(value) > MAX_VALUE:
        raise StoreError(
            f"{backend}: value for {key!r} is {len(value)} bytes, over the {MAX_VALUE} byte bound"
        )


def deleted(key: str, revision: int) -> KeyValue:
    """The kv of a delete event: etcd's shape (no value, no create revision, no version)."""
    return KeyValue(key=key, value=b"", create_revision=0, mod_revision=revision, version=0)
