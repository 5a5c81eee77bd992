"""The central store's one interface, shared by every backend.

A revisioned key-value store in the shape of etcd v3: every write bumps one global revision;
keys carry create/mod revisions and a version; a watch streams the events of a prefix from a
revision on; a transaction compares mod revisions and then applies all of its operations or none;
a lease makes keys vanish when its holder stops renewing it. Values are opaque bytes here
(msgpack, see `codec`); keys are readable paths (see `keys`).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal


class StoreError(Exception):
    """A store operation failed; the message names the backend and the operation."""


class StoreUnavailable(StoreError):
    """No endpoint of the store answered (after failover)."""


class CompactedError(StoreError):
    """A watch asked for a revision the store has compacted away; re-list, then watch again."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested} is compacted (oldest kept: {compact_revision}); re-list"
        )
        self.requested = requested
        self.compact_revision = compact_revision


class LeaseNotFound(StoreError):
    """The lease expired or was revoked."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For a delete, `kv.value` is b"" and `kv.mod_revision` is its revision."""

    type: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class Compare:
    """Succeeds when `key`'s mod revision equals `mod_revision` (0 means: the key is absent)."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


class Store(abc.ABC):
    """The contract every backend (memory, sqlite, etcd) passes, checked by tests/store."""

    url: str

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix`, sorted by key, and the store revision they were read at."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write one key; returns the new revision. Raises LeaseNotFound for a dead lease."""

    @abc.abstractmethod
    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""

    @abc.abstractmethod
    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """All compares hold → apply `success`, else `failure`; atomically, one revision."""

    @abc.abstractmethod
    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[Event]]]:
        """Stream batches of events under `prefix` with revision >= `start_revision`.

        Every event is delivered once and in revision order, also across reconnects; raises
        CompactedError when `start_revision` is no longer available.
        """

    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> int:
        """A new lease of `ttl` seconds; returns its id (never 0)."""

    @abc.abstractmethod
    async def keep_alive(self, lease: int) -> float:
        """Renew a lease; returns its new TTL. Raises LeaseNotFound if it already expired."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """End a lease now, deleting its keys. Revoking an unknown lease is not an error."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget history before `revision`: watches from older revisions raise CompactedError."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...
