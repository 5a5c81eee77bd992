"""Leader election through a store lease, so several controllers can run and one acts.

The leader key (`/mesh/v1/leader/<name>`) holds the leader's identity and is put under a lease
the leader holds (`store.lease.hold_lease`): when the leader dies its lease expires and the key
goes with it. A candidate creates the key with a compare on "absent"; one that finds its own
identity there (a restart faster than the TTL) takes it over with a compare on the key's mod
revision, as client-go's election does for its own Lease (`nodeagent.kube.leader`'s rule:
same holder → renew). Leading ends when the lease is lost (`hold_lease` raises): the work is
cancelled before another candidate can win, since the key vanishes only with the lease; and
every transaction of the leader compares the key's mod revision (`fence`), so a write a deposed
leader was still sending cannot land after a successor took over.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio

from nodeagent.log import get_logger
from nodeagent.store import keys
from nodeagent.store.base import Compare, LeaseNotFound, Put, Store, StoreError
from nodeagent.store.codec import DecodeError, decode, encode
from nodeagent.store.lease import hold_lease

log = get_logger("rollout.leader")


def leader_key(name: str) -> str:
    return f"{keys.ROOT}leader/{name}"


class StoreElection:
    def __init__(
        self, store: Store, *, name: str, identity: str, ttl: float = 10.0, retry: float = 1.0
    ) -> None:
        self.store = store
        self.key = leader_key(name)
        self.identity = identity
        self.ttl = ttl
        self.retry = retry
        self.leading = False
        self.attempts = 0  # acquisition attempts, for tests and logs
        # While leading: the leader key as this leader wrote it. The controller adds it to every
        # transaction, so a deposed leader's late write fails instead of landing.
        self.fence: Compare | None = None

    async def holder(self) -> tuple[str, int]:
        """(identity, mod revision) of the key; ("", 0) when nobody leads."""
        kv = await self.store.get(self.key)
        if kv is None:
            return "", 0
        try:
            record = decode(kv)
        except DecodeError:
            return "?", kv.mod_revision
        who = record.get("identity") if isinstance(record, dict) else None
        return (who if isinstance(who, str) else "?"), kv.mod_revision

    async def try_acquire(self, lease: int) -> bool:
        self.attempts += 1
        who, revision = await self.holder()
        if who and who != self.identity:
            return False
        value = encode({"version": 1, "identity": self.identity})
        result = await self.store.txn(
            [Compare(self.key, revision)], [Put(self.key, value, lease=lease)]
        )
        if result.succeeded:
            self.fence = Compare(self.key, result.revision)
        return result.succeeded

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Forever: become leader, run `lead()` while leading, cancel it when not."""
        while True:
            try:
                await self._one_term(lead)
            except* (LeaseNotFound, StoreError) as group:
                log.warning("rollout.leader.lost", me=self.identity, error=str(group.exceptions[0]))
            self.leading = False
            self.fence = None
            await trio.sleep(self.retry)

    async def _one_term(self, lead: Callable[[], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            lease = await nursery.start(partial(hold_lease, self.store, self.ttl))
            while not await self.try_acquire(lease):  # noqa: ASYNC110
                # Polling: the key of a dead leader vanishes with its lease (at most ttl).
                await trio.sleep(self.retry)
            self.leading = True
            log.info("rollout.leader.acquired", me=self.identity, key=self.key)
            await lead()
            nursery.cancel_scope.cancel()
