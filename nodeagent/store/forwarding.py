"""A store that forwards every call to another one: the base for wrappers that add behaviour
(fault injection in tests today; metrics or tracing of store calls later) without restating the
whole interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager

from nodeagent.store.base import Compare, Event, KeyValue, Op, Store, TxnResult


class ForwardingStore(Store):
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self.inner.range(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self.inner.delete(key, prefix=prefix)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        return await self.inner.txn(compares, success, failure)

    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[Event]]]:
        return self.inner.watch(prefix, start_revision=start_revision)

    async def grant_lease(self, ttl: float) -> int:
        return await self.inner.grant_lease(ttl)

    async def keep_alive(self, lease: int) -> float:
        return await self.inner.keep_alive(lease)

    async def revoke_lease(self, lease: int) -> None:
        await self.inner.revoke_lease(lease)

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)

    async def aclose(self) -> None:
        await self.inner.aclose()
