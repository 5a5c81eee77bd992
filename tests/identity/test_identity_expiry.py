"""A certificate that expires while the CA is away: `can_serve` turns False and `wait_changed`
says so at the expiry itself, not at the next retry (the agent then marks the identity's
workloads Unhealthy, so peers stop picking them)."""

from __future__ import annotations

import trio
from helpers_identity import TD, RunningSigner, add_workload, authority, spiffe, wall_clock

from nodeagent.ca.signer import Signer
from nodeagent.identity.manager import IdentityManager
from nodeagent.store import open_store

WEB = spiffe("default", "web")


async def test_expiry_during_backoff_is_announced_at_expiry(autojump_clock: object) -> None:
    store = await open_store("memory://")
    await add_workload(store, "n1", "w1", "default", "web")
    clock = wall_clock()
    m = IdentityManager(
        store, "n1", TD, clock=clock, request_timeout=5, backoff_initial=1, backoff_max=300
    )
    async with trio.open_nursery() as nursery:
        ca = RunningSigner(nursery, Signer(store, authority(), TD, ttl=60, clock=clock))
        await ca.start()
        await nursery.start(m.run)
        m.ensure(WEB)
        await m.wait_ready(WEB, 5)
        issued = trio.current_time()
        ca.stop()
        # Renewal from 30 s fails; backoff 1, 2, 4, 8 s… would next wake well after 60 s.
        with trio.fail_after(120):
            while m.can_serve(WEB):
                await m.wait_changed()
        # X.509 times are whole seconds: the expiry is within 1 s before issued + 60.
        assert 59 <= trio.current_time() - issued < 61
        nursery.cancel_scope.cancel()
    await store.aclose()
