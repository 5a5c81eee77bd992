"""Lease-based leader election: the pure decision, and handover between two replicas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trio
from apiserver import FakeApiServer
from kube_helpers import TIMEOUT, memory_client, until

from nodeagent.kube.leader import LeaderElector, format_time, lease_action, parse_time

EPOCH = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def trio_clock() -> datetime:
    return EPOCH + timedelta(seconds=trio.current_time())


def lease(holder: str, renewed: datetime, duration: int = 15) -> dict[str, object]:
    return {
        "metadata": {"name": "kube-sync", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "renewTime": format_time(renewed),
        },
    }


def test_decide() -> None:
    now = EPOCH
    assert lease_action(None, "a", now) == "create"
    assert lease_action(lease("a", now), "a", now) == "renew"
    assert lease_action(lease("b", now - timedelta(seconds=14)), "a", now) == "wait"
    assert lease_action(lease("b", now - timedelta(seconds=15)), "a", now) == "takeover"
    assert lease_action(lease("", now), "a", now) == "takeover"
    assert lease_action({"spec": {"holderIdentity": "b"}}, "a", now) == "takeover"


def test_time_round_trip() -> None:
    t = EPOCH + timedelta(microseconds=123456)
    assert format_time(t) == "2026-11-24T08:00:00.123456Z"
    assert parse_time(format_time(t)) == t
    assert parse_time("not a time") is None


def test_timing_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="retry_period < renew_deadline < lease_duration"):
        LeaderElector(
            None,  # type: ignore[arg-type]
            namespace="ns",
            name="l",
            identity="a",
            lease_duration=5,
            renew_deadline=6,
            retry_period=1,
        )


def _elector(api: FakeApiServer, nursery: trio.Nursery, me: str) -> LeaderElector:
    return LeaderElector(
        memory_client(api, nursery),
        namespace="mesh-system",
        name="kube-sync",
        identity=me,
        lease_duration=15,
        renew_deadline=10,
        retry_period=2,
        clock=trio_clock,
    )


async def test_handover_on_clean_stop_and_on_crash(autojump_clock: object) -> None:
    api = FakeApiServer()
    leading: list[str] = []

    def lead_as(me: str) -> object:
        async def lead() -> None:
            leading.append(me)
            try:
                await trio.sleep_forever()
            finally:
                leading.remove(me)

        return lead

    async with trio.open_nursery() as nursery:
        a, b = _elector(api, nursery, "a"), _elector(api, nursery, "b")
        a_scope = trio.CancelScope()

        async def run_a() -> None:
            with a_scope:
                await a.run(lead_as("a"))  # type: ignore[arg-type]

        nursery.start_soon(run_a)
        with trio.fail_after(TIMEOUT):
            await until(lambda: leading == ["a"])
        nursery.start_soon(b.run, lead_as("b"))
        # b waits while a renews, for far longer than the lease duration.
        await trio.sleep(60)
        assert leading == ["a"]
        stored = api.objects[("coordination.k8s.io", "leases")][("mesh-system", "kube-sync")]
        assert stored["spec"]["holderIdentity"] == "a"

        # Clean stop: a releases the Lease, b takes over at its next try, not after 15 s.
        stopped_at = trio.current_time()
        a_scope.cancel()
        with trio.fail_after(TIMEOUT):
            await until(lambda: leading == ["b"])
        assert trio.current_time() - stopped_at <= 2.5
        stored = api.objects[("coordination.k8s.io", "leases")][("mesh-system", "kube-sync")]
        assert stored["spec"]["holderIdentity"] == "b"
        assert stored["spec"]["leaseTransitions"] == 1

        # Crash: a holder that stops renewing without releasing (simulated by writing its
        # Lease) is taken over only once the lease duration has passed.
        nursery.cancel_scope.cancel()

    api2 = FakeApiServer()
    api2.apply(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "kube-sync", "namespace": "mesh-system"},
            "spec": {
                "holderIdentity": "crashed",
                "leaseDurationSeconds": 15,
                "renewTime": format_time(trio_clock()),
            },
        }
    )
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_elector(api2, nursery, "c").run, lead_as("c"))
        with trio.fail_after(30):
            await until(lambda: leading == ["c"])
        assert 15 <= trio.current_time() - start <= 17.5
        nursery.cancel_scope.cancel()


async def test_leader_stops_leading_when_it_cannot_renew(autojump_clock: object) -> None:
    api = FakeApiServer()
    events: list[str] = []

    async def lead() -> None:
        events.append("start")
        try:
            await trio.sleep_forever()
        finally:
            events.append("stop")

    async with trio.open_nursery() as nursery:
        elector = _elector(api, nursery, "a")
        nursery.start_soon(elector.run, lead)
        with trio.fail_after(TIMEOUT):
            await until(lambda: events == ["start"])
        # Another writer steals the Lease (e.g. an operator, or a partition healed).
        current = api.objects[("coordination.k8s.io", "leases")][("mesh-system", "kube-sync")]
        current["spec"]["holderIdentity"] = "thief"
        current["spec"]["renewTime"] = format_time(trio_clock())
        with trio.fail_after(TIMEOUT):
            await until(lambda: events == ["start", "stop"])
        assert not elector.leading
        nursery.cancel_scope.cancel()
