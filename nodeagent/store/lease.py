"""Holding a lease for as long as a task runs (a node's registrations vanish when it dies).

`hold_lease` grants a lease (or keeps `reuse`, a lease from an earlier run, if the store still
has it), reports its id through `task_status.started`, renews it every ttl/3, and revokes it when
cancelled (shielded and bounded, so shutdown never hangs on a dead store) unless `revoke=False`
(an agent that restarts keeps its pods' registrations under the same lease). A renewal that fails
for a transient reason is retried quickly while the lease can still be alive.

A plain holder (no `on_lease`) fails fast: store errors of the first grant propagate, and once the
lease is gone (LeaseNotFound, or no renewal got through for a whole TTL) it raises LeaseNotFound.
Given `on_lease`, the holder is patient, as the agent must be (its keys must live under some lease
for as long as it runs, whatever the store does): the first lease is waited for while the store
does not answer; `on_lease(lease)` is awaited for every lease held, reused or granted (the
caller's chance to put its keys again), and retried while it fails with a StoreError; a lease the
store says is gone is replaced at once, and while the store does not answer it is asked again
about once a second, so a store that comes back after a stall longer than the TTL (its leases
expired meanwhile) gets the keys back within a second or so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from nodeagent.log import get_logger
from nodeagent.store.base import LeaseNotFound, Store, StoreError

log = get_logger("store.lease")

REVOKE_TIMEOUT = 5.0
RETRY_INTERVAL = 0.2
# How often a patient holder asks a store that does not answer (at start, or after a whole TTL
# without a renewal): the delay between the store's return and the keys being put back.
PATIENT_RETRY_MAX = 1.0

LeaseCallback = Callable[[int], Awaitable[None]]


class LeaseNotHeld(StoreError):
    """A write needs the holder's lease and none is held yet (the store has not answered)."""


async def hold_lease(
    store: Store,
    ttl: float,
    *,
    reuse: int = 0,
    on_lease: LeaseCallback | None = None,
    revoke: bool = True,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold a lease of `ttl` seconds until cancelled; `started(lease_id)` once it is held.

    `reuse`: a lease id to keep if the store still knows it. `on_lease`: makes the holder
    patient (see the module docstring); awaited with every lease held, the first one before
    `started()`. `revoke`: revoke the lease on the way out.
    """
    if on_lease is None:
        lease = await _first_lease(store, ttl, reuse)
    else:
        lease = await _first_lease_patiently(store, ttl, reuse)
    try:
        if on_lease is not None:
            await _call_back_patiently(on_lease, lease)
        task_status.started(lease)
        renewed_at = trio.current_time()
        interval = ttl / 3
        lost = False  # the store forgot `lease`: grant a new one
        owed = False  # `lease` is new and on_lease has not completed for it yet
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
                assert on_lease is not None  # owed is only set with a callback
                try:
                    await on_lease(lease)
                except StoreError as exc:
                    log.warning("lease.on_lease_failed", lease=lease, error=str(exc))
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
                if on_lease is None:
                    raise
                lost, owed, interval = True, False, 0
                continue
            except StoreError as exc:
                if trio.current_time() - renewed_at >= ttl:
                    if on_lease is None:
                        raise LeaseNotFound(
                            f"{store.url}: lease {lease:#x} lost: no renewal for {ttl}s ({exc})"
                        ) from exc
                    # Only the store can say the lease is gone (etcd extends leases across its
                    # own outages): keep asking, slower than the retry's pace but often enough
                    # that a store back from a stall gets the keys back within about a second.
                    interval = min(ttl / 3, PATIENT_RETRY_MAX)
                log.warning("lease.renew_failed", lease=lease, store=store.url, error=str(exc))
                continue
            renewed_at = trio.current_time()
            if not owed:
                interval = max(min(ttl, granted), 0.01) / 3
    finally:
        if revoke:
            await _revoke(store, lease)


async def _first_lease(store: Store, ttl: float, reuse: int) -> int:
    lease = await _reused(store, reuse) if reuse else 0
    if not lease:
        lease = await store.grant_lease(ttl)
        log.info("lease.granted", lease=lease, ttl=ttl, store=store.url)
    return lease


async def _first_lease_patiently(store: Store, ttl: float, reuse: int) -> int:
    """`_first_lease`, asked again (backing off to PATIENT_RETRY_MAX) until the store answers."""
    backoff = RETRY_INTERVAL
    while True:
        try:
            return await _first_lease(store, ttl, reuse)
        except StoreError as exc:
            log.warning("lease.unavailable", store=store.url, error=str(exc), retry_in=backoff)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, PATIENT_RETRY_MAX)


async def _call_back_patiently(on_lease: LeaseCallback, lease: int) -> None:
    """Await `on_lease(lease)` until it completes without a StoreError (a lease it outlives is
    found lost at the next renewal, and replaced)."""
    backoff = RETRY_INTERVAL
    while True:
        try:
            await on_lease(lease)
            return
        except StoreError as exc:
            log.warning("lease.on_lease_failed", lease=lease, error=str(exc), retry_in=backoff)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, PATIENT_RETRY_MAX)


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
