"""Holding a lease for as long as a task runs (a node's registrations vanish when it dies).

`hold_lease` grants a lease, reports its id through `task_status.started`, renews it every
ttl/3, and revokes it when cancelled (shielded and bounded, so shutdown never hangs on a dead
store). A renewal that fails for a transient reason is retried quickly while the lease can still
be alive; once the lease is gone (LeaseNotFound, or no renewal got through for a whole TTL) it
raises LeaseNotFound, so the caller re-registers under a new lease.
"""

from __future__ import annotations

import trio

from nodeagent.log import get_logger
from nodeagent.store.base import LeaseNotFound, Store, StoreError

log = get_logger("store.lease")

REVOKE_TIMEOUT = 5.0
RETRY_INTERVAL = 0.2


async def hold_lease(
    store: Store,
    ttl: float,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Grant a lease of `ttl` seconds, `started(lease_id)`, keep it alive until cancelled."""
    lease = await store.grant_lease(ttl)
    log.info("lease.granted", lease=lease, ttl=ttl, store=store.url)
    try:
        task_status.started(lease)
        renewed_at = trio.current_time()
        interval = ttl / 3
        while True:
            await trio.sleep(interval)
            try:
                granted = await store.keep_alive(lease)
            except LeaseNotFound:
                log.warning("lease.lost", lease=lease, store=store.url)
                raise
            except StoreError as exc:
                if trio.current_time() - renewed_at >= ttl:
                    raise LeaseNotFound(
                        f"{store.url}: lease {lease:#x} lost: no renewal for {ttl}s ({exc})"
                    ) from exc
                log.warning("lease.renew_failed", lease=lease, store=store.url, error=str(exc))
                interval = min(RETRY_INTERVAL, ttl / 10)
                continue
            renewed_at = trio.current_time()
            interval = max(min(ttl, granted), 0.01) / 3
    finally:
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
