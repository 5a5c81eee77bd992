"""Holding a lease for as long as a task runs (a node's registrations vanish when it dies).

`hold_lease` grants a lease (or keeps `reuse`, a lease from an earlier run, if the store still
has it), reports its id through `task_status.started`, renews it every ttl/3, and revokes it when
cancelled (shielded and bounded, so shutdown never hangs on a dead store) unless `revoke=False`
(an agent that restarts keeps its pods' registrations under the same lease). A renewal that fails
for a transient reason is retried quickly while the lease can still be alive. Once the lease is
gone (LeaseNotFound, or no renewal got through for a whole TTL) it raises LeaseNotFound, so the
caller re-registers under a new lease. Given `on_new_lease`, it waits instead for the store to
answer: only once the store says the lease is gone does it grant a new lease and await
`on_new_lease(lease)` (the caller's chance to put its keys again), retrying a grant or a callback
that fails with a StoreError until the store answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from nodeagent.log import get_logger
from nodeagent.store.base import LeaseNotFound, Store, StoreError

log = get_logger("store.lease")

REVOKE_TIMEOUT = 5.0
RETRY_INTERVAL = 0.2

NewLeaseCallback = Callable[[int], Awaitable[None]]


async def hold_lease(
    store: Store,
    ttl: float,
    *,
    reuse: int = 0,
    on_new_lease: NewLeaseCallback | None = None,
    revoke: bool = True,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold a lease of `ttl` seconds until cancelled; `started(lease_id)` once it is held.

    `reuse`: a lease id to keep if the store still knows it (no callback then: its keys are
    still there). `on_new_lease`: awaited with every lease granted here, the first one before
    `started()` (its errors then fail the start-up), and makes a lost lease be replaced instead
    of raising LeaseNotFound. `revoke`: revoke the lease on the way out.
    """
    lease = await _reused(store, reuse) if reuse else 0
    fresh = not lease
    if fresh:
        lease = await store.grant_lease(ttl)
        log.info("lease.granted", lease=lease, ttl=ttl, store=store.url)
    try:
        if fresh and on_new_lease is not None:
            await on_new_lease(lease)
        task_status.started(lease)
        renewed_at = trio.current_time()
        interval = ttl / 3
        lost = False  # the store forgot `lease`: grant a new one
        owed = False  # `lease` is new and on_new_lease has not completed for it yet
        while True:
            await trio.sleep(interval)
            interval = min(RETRY_INTERVAL, ttl / 10)
            if lost:
                try:
                    lease = await store.grant_lease(ttl)
                except StoreError as exc:
                    log.warning("lease.grant_failed", store=store.url, error=str(exc))
                    continue
                log.info("lease.granted", lease=lease, ttl=ttl, store=store.url)
                lost, owed, renewed_at = False, True, trio.current_time()
            if owed:
                assert on_new_lease is not None  # owed is only set with a callback
                try:
                    await on_new_lease(lease)
                except StoreError as exc:
                    log.warning("lease.on_new_lease_failed", lease=lease, error=str(exc))
                    if trio.current_time() - renewed_at < ttl / 3:
                        continue  # else renew first, so retrying cannot outlive the lease
                else:
                    owed = False
                    interval = ttl / 3
                    continue
            try:
                granted = await store.keep_alive(lease)
            except LeaseNotFound:
                log.warning("lease.lost", lease=lease, store=store.url)
                if on_new_lease is None:
                    raise
                lost, owed, interval = True, False, 0
                continue
            except StoreError as exc:
                if trio.current_time() - renewed_at >= ttl:
                    if on_new_lease is None:
                        raise LeaseNotFound(
                            f"{store.url}: lease {lease:#x} lost: no renewal for {ttl}s ({exc})"
                        ) from exc
                    # Only the store can say the lease is gone (etcd extends leases across its
                    # own outages): keep trying it, at the renewal pace rather than the retry's.
                    interval = ttl / 3
                log.warning("lease.renew_failed", lease=lease, store=store.url, error=str(exc))
                continue
            renewed_at = trio.current_time()
            if not owed:
                interval = max(min(ttl, granted), 0.01) / 3
    finally:
        if revoke:
            await _revoke(store, lease)


async def _reused(store: Store, lease: int) -> int:
    """`lease` if the store still has it (renewed now), else 0; other store errors propagate."""
    try:
        await store.keep_alive(lease)
    except LeaseNotFound:
        log.info("lease.expired_meanwhile", lease=lease, store=store.url)
        return 0
    log.info("lease.reused", lease=lease, store=store.url)
    return lease


async def _revoke(store: Store, lease: int) -> None:
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + REVOKE_TIMEOUT
        try:
            await store.revoke_lease(lease)
            log.info("lease.revoked", lease=lease, store=store.url)
        except StoreError as exc:
            # the lease then expires by itself within ttl; nothing else to do
            log.warning("lease.revoke_failed", lease=lease, store=store.url, error=str(exc))
    if scope.cancelled_caught:
        log.warning("lease.revoke_timeout", lease=lease, store=store.url)
