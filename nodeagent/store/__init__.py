"""The central store: one interface (`base.Store`), three backends, chosen by URL.

    store = await open_store("sqlite:///var/lib/nodeagent/mesh.db")
    try: ...
    finally: await store.aclose()

or `async with store_scope(url) as store: ...`. URLs: `memory://[name]`,
`sqlite:///abs/path.db`, `etcd://h1:2379,h2:2379[?cacert=…&cert=…&key=…&user=…&password=…]`
(see `url` and docs/store.md). The CLIs take the URL from `$MESH_STORE`, else `DEFAULT_URL`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nodeagent.store.base import (
    CompactedError,
    Compare,
    Delete,
    Event,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
    TxnResult,
)
from nodeagent.store.url import StoreURL, parse_url

DEFAULT_URL = "sqlite:///var/lib/nodeagent/mesh.db"
ENV_VAR = "MESH_STORE"

__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "CompactedError",
    "Compare",
    "Delete",
    "Event",
    "KeyValue",
    "LeaseNotFound",
    "Op",
    "Put",
    "Store",
    "StoreError",
    "StoreURL",
    "StoreUnavailable",
    "TxnResult",
    "open_store",
    "parse_url",
    "store_scope",
]


async def open_store(url: str) -> Store:
    """Open the store at `url`; the caller must `await store.aclose()`.

    A malformed URL is a StoreError naming the URL and the problem. For etcd this does not wait
    for a member to answer: the first request fails over (or raises StoreUnavailable).
    """
    parsed = parse_url(url)
    if parsed.scheme == "memory":
        from nodeagent.store.memory import DEFAULT_RETENTION, MemoryStore

        retention = int(parsed.number("retention", DEFAULT_RETENTION, minimum=1))
        return MemoryStore(parsed.redacted, name=parsed.name, retention=retention)
    if parsed.scheme == "sqlite":
        from nodeagent.store.sqlite import SqliteStore

        return await SqliteStore.open(parsed)
    from nodeagent.store.etcd import EtcdStore

    return await EtcdStore.open(parsed)


@asynccontextmanager
async def store_scope(url: str) -> AsyncIterator[Store]:
    """`open_store` as an async context manager that closes the store on the way out."""
    store = await open_store(url)
    try:
        yield store
    finally:
        await store.aclose()
