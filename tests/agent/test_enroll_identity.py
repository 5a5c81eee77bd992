"""Enrollment with the real identity manager and the real CA signer over a memory store.

- The first certificate request of a new pod's identity is signed: the Workload is registered
  before the request is sent (issue 21, item 16: it used to be refused once, costing a 1 s retry
  at every pod start).
- The Workload's status follows the certificate: Unhealthy until it is issued, Healthy after,
  Unhealthy again when it expires while the CA is down, Healthy once the CA is back.

The pod plumbing is the fake of `fake_plumbing.py` (no root); the sandbox test
tests/integration/test_workload_health.py runs the same story on real pods.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio
from fake_plumbing import NODE, FakePlumbing, Faults, request
from identity.helpers_identity import TD, RunningSigner, authority, spiffe, wall_clock

from nodeagent.agent.enroll import Enroller
from nodeagent.agent.state import AgentState
from nodeagent.ca.signer import Signer
from nodeagent.cni.metadata import RuntimeArgsMetadataSource
from nodeagent.identity.manager import IdentityManager
from nodeagent.store import codec, keys
from nodeagent.store.base import Event
from nodeagent.store.memory import MemoryStore

WEB = spiffe("default", "default")


def _enroller(
    nursery: trio.Nursery, store: MemoryStore, manager: IdentityManager, path: Path
) -> Enroller:
    plumbing = FakePlumbing(Faults())
    # Slow enough that a certificate request sent before the rules are in place would be
    # answered (refused) before the Workload is registered.
    plumbing.apply_time = 0.2
    return Enroller(
        node=NODE,
        store=store,
        state=AgentState(path),
        metadata=RuntimeArgsMetadataSource(),
        pods_nursery=nursery,
        lease=lambda: 0,
        identities=manager,
        plumbing=plumbing,
    )


async def _statuses(events: AsyncIterator[list[Event]], key: str) -> AsyncIterator[str]:
    async for batch in events:
        for ev in batch:
            if ev.type == "put" and ev.kv.key == key:
                yield codec.decode(ev.kv)["status"]["health"]


async def test_first_request_of_a_new_pod_is_signed(tmp_path: Path, nursery: trio.Nursery) -> None:
    store = MemoryStore()
    clock = wall_clock()
    signer = Signer(store, authority(), TD, ttl=3600, clock=clock)
    manager = IdentityManager(store, NODE, TD, clock=clock)
    await nursery.start(signer.run)
    await nursery.start(manager.run)
    enroller = _enroller(nursery, store, manager, tmp_path / "enrolled.msgpack")
    nursery.start_soon(enroller.maintain_status)
    key = keys.workload(NODE, "u1")
    async with (
        store.watch(keys.WORKLOADS, start_revision=store.revision + 1) as events,
        contextlib.aclosing(_statuses(events, key)) as statuses,
    ):
        await enroller.add(request())
        with trio.fail_after(10):
            assert await anext(statuses) == "Unhealthy"  # registered before the certificate
            assert await anext(statuses) == "Healthy"
    assert manager.can_serve(WEB)
    assert signer.stats == {"signed": 1, "rejected": 0, "store_errors": 0}
    [row] = manager.certificates()
    assert row["failures"] == 0
    assert row["last_error"] is None
    await store.aclose()


async def test_status_follows_expiry_while_the_ca_is_down(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    store = MemoryStore()
    clock = wall_clock()
    ca = RunningSigner(nursery, Signer(store, authority(), TD, ttl=60, clock=clock))
    manager = IdentityManager(
        store, NODE, TD, clock=clock, request_timeout=5, backoff_initial=1, backoff_max=300
    )
    await ca.start()
    await nursery.start(manager.run)
    enroller = _enroller(nursery, store, manager, tmp_path / "enrolled.msgpack")
    nursery.start_soon(enroller.maintain_status)
    key = keys.workload(NODE, "u1")
    async with (
        store.watch(keys.WORKLOADS, start_revision=store.revision + 1) as events,
        contextlib.aclosing(_statuses(events, key)) as statuses,
    ):
        await enroller.add(request())
        assert await anext(statuses) == "Unhealthy"
        assert await anext(statuses) == "Healthy"
        issued = trio.current_time()
        ca.stop()
        # Renewal at 30 s fails (no CA), retried with backoff; at 60 s the certificate expires.
        assert await anext(statuses) == "Unhealthy"
        # At expiry (X.509 times are whole seconds), not a backoff later.
        assert 59 <= trio.current_time() - issued < 61
        assert not manager.can_serve(WEB)
        await ca.start()
        assert await anext(statuses) == "Healthy"
    assert manager.can_serve(WEB)
    await store.aclose()
