"""Enrollment is all or nothing: every step of ADD, DEL and re-adoption can fail or be cancelled,
and afterwards nothing is left — no rules, no listeners, no open netns handle, no Workload in the
store, nothing in the agent's maps, the identity manager or the state file.

Runs without root against the fault-injecting fakes of `fake_plumbing.py` (the real store,
state file, PodProxy and DnsProxy on loopback sockets); tests/integration/test_enrollment.py
covers the real plumbing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from fake_plumbing import (
    NODE,
    FakeIdentities,
    FakePlumbing,
    Faults,
    FaultyState,
    FaultyStore,
    request,
)

from nodeagent.agent.enroll import Enroller
from nodeagent.agent.state import AgentState
from nodeagent.cni.errors import ErrorCode
from nodeagent.cni.metadata import RuntimeArgsMetadataSource
from nodeagent.cni.protocol import CniRequest, Command, EnrollError
from nodeagent.store import codec, keys

IDENTITY = "spiffe://cluster.local/ns/default/sa/default"
ADD_STEPS = [
    "open_netns",
    "bind_listeners",
    "make_dns",
    "bind_dns",
    "apply_redirection",
    "register",
    "ensure_identity",
    "save_state",
]
# Steps after enrollment's last checkpoint: a cancellation there arrives once it is complete.
AFTER_LAST_CHECKPOINT = {"ensure_identity", "save_state"}
DEL_STEPS = ["release_identity", "unregister", "remove_redirection", "save_state"]


@dataclass
class Rig:
    faults: Faults
    plumbing: FakePlumbing
    store: FaultyStore
    identities: FakeIdentities
    state_path: Path
    enroller: Enroller

    async def workload_keys(self) -> list[str]:
        kvs, _ = await self.store.range(keys.WORKLOADS)
        return [kv.key for kv in kvs]

    async def left(self) -> dict[str, object]:
        """Everything enrollment can leave behind, by kind; all empty when nothing is."""
        tmp = self.state_path.with_suffix(".tmp")
        return {
            "rules": set(self.plumbing.rules),
            "sockets": self.plumbing.open_sockets(),
            "netns": self.plumbing.open_netns_handles(),
            "workloads": await self.workload_keys(),
            "pods": dict(self.enroller.pods),
            "state.pods": dict(self.enroller.state.pods),
            "on_disk": AgentState.load(self.state_path).pods,
            "tmp_file": tmp.exists(),
            "identities": set(self.identities.ensured),
        }

    async def assert_nothing_left(
        self, *, except_: str | None = None, keep: tuple[str, ...] = ()
    ) -> None:
        left = {k: v for k, v in (await self.left()).items() if v and k not in keep}
        if except_ is not None:  # the resource whose own removal failed
            left.pop(except_, None)
        assert left == {}, f"left behind: {left}"

    async def assert_enrolled(self, uid: str = "u1") -> None:
        pod = self.enroller.pods[uid]
        assert pod.record.netns in self.plumbing.rules
        assert len(self.plumbing.open_sockets()) == 5  # 15001/15006/15008 + DNS udp/tcp
        assert await self.workload_keys() == [keys.workload(NODE, uid)]
        assert set(AgentState.load(self.state_path).pods) == {uid}
        assert self.identities.ensured == {IDENTITY}
        assert pod.listeners()  # served


def make_enroller(
    nursery: trio.Nursery, faults: Faults, plumbing: FakePlumbing, store: FaultyStore, path: Path
) -> tuple[Enroller, FakeIdentities]:
    state = FaultyState.load(path)
    assert isinstance(state, FaultyState)
    state.faults = faults
    identities = FakeIdentities(faults)
    enroller = Enroller(
        node=NODE,
        store=store,
        state=state,
        metadata=RuntimeArgsMetadataSource(),
        pods_nursery=nursery,
        lease=lambda: 0,
        identities=identities,
        plumbing=plumbing,
    )
    return enroller, identities


@pytest.fixture
async def rig(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Rig]:
    faults = Faults()
    plumbing = FakePlumbing(faults)
    store = FaultyStore(faults)
    path = tmp_path / "enrolled.msgpack"
    enroller, identities = make_enroller(nursery, faults, plumbing, store, path)
    yield Rig(faults, plumbing, store, identities, path, enroller)
    await store.aclose()


@contextlib.contextmanager
def expect_failure(mode: str) -> Iterator[None]:
    if mode == "raise":
        with pytest.raises((EnrollError, RuntimeError)):
            yield
    else:
        yield


def assert_fault_fired(faults: Faults, step: str) -> None:
    assert step in faults.steps, f"step {step} was never reached: {faults.steps}"
    assert faults.step is None, f"the fault at {step} did not fire"


# -- ADD --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raise", "cancel"])
@pytest.mark.parametrize("step", ADD_STEPS)
async def test_add_failing_at_any_step_leaves_nothing(rig: Rig, step: str, mode: str) -> None:
    with trio.CancelScope() as scope:
        rig.faults.arm(step, mode, scope)
        with expect_failure(mode):
            await rig.enroller.add(request())
    assert_fault_fired(rig.faults, step)
    if mode == "cancel" and step in AFTER_LAST_CHECKPOINT and not scope.cancelled_caught:
        await rig.assert_enrolled()
    else:
        assert mode == "raise" or scope.cancelled_caught
        await rig.assert_nothing_left()
    # Nothing half-done blocks the runtime's retry: the same ADD now meshes the pod, once.
    await rig.enroller.add(request())
    await rig.assert_enrolled()
    await rig.enroller.delete(request(Command.DEL))
    await rig.assert_nothing_left()


async def test_add_failing_to_register_is_try_again_later(rig: Rig) -> None:
    rig.faults.arm("register", "raise")
    with pytest.raises(EnrollError) as info:
        await rig.enroller.add(request())
    assert info.value.code == ErrorCode.TRY_AGAIN_LATER
    await rig.assert_nothing_left()


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "x"),
        ("mesh.nodeagent.io/destination-l7", "sometimes"),
    ],
)
async def test_bad_annotation_leaves_nothing(rig: Rig, annotation: str, value: str) -> None:
    req = request()
    req.args["MESH_POD_META"] = ""
    rig.enroller.metadata = _Meta({annotation: value})
    with pytest.raises(EnrollError) as info:
        await rig.enroller.add(req)
    assert info.value.code == ErrorCode.INVALID_CONFIG
    assert annotation in str(info.value)
    await rig.assert_nothing_left()


class _Meta:
    def __init__(self, annotations: dict[str, str]) -> None:
        self.annotations = annotations

    async def lookup(self, req: CniRequest) -> object:
        from nodeagent.cni.metadata import PodMetadata

        await trio.lowlevel.checkpoint()
        return PodMetadata(annotations=self.annotations)


# -- DEL --------------------------------------------------------------------------------------

DEL_LEFT = {
    "release_identity": "identities",
    "unregister": "workloads",
    "remove_redirection": "rules",
    "save_state": "on_disk",
}


@pytest.mark.parametrize("mode", ["raise", "cancel"])
@pytest.mark.parametrize("step", DEL_STEPS)
async def test_del_failing_at_any_step_still_removes_the_rest(
    rig: Rig, step: str, mode: str
) -> None:
    await rig.enroller.add(request())
    await rig.assert_enrolled()
    with trio.CancelScope() as scope:
        rig.faults.arm(step, mode, scope)
        await rig.enroller.delete(request(Command.DEL))  # DEL never fails for a known pod
    assert_fault_fired(rig.faults, step)
    if mode == "raise":
        # Only the resource whose own removal failed may remain (a lease reaps a Workload).
        await rig.assert_nothing_left(except_=DEL_LEFT[step])
    else:
        await rig.assert_nothing_left()


async def test_del_of_an_unknown_pod_is_a_no_op(rig: Rig) -> None:
    await rig.enroller.delete(request(Command.DEL, uid="nobody"))
    await rig.assert_nothing_left()


# -- re-adoption after a restart ----------------------------------------------------------------


async def restarted(rig: Rig, nursery: trio.Nursery) -> Rig:
    """Enroll a pod with a first agent, let that agent die (its rules, Workload and state file
    stay, as after kill -9), and make a second agent over the same store and state file."""
    async with trio.open_nursery() as first_pods:
        first, _ = make_enroller(first_pods, Faults(), rig.plumbing, rig.store, rig.state_path)
        await first.add(request())
        first_pods.cancel_scope.cancel()
    for ns in rig.plumbing.netns:  # the dead process's fds
        ns.close()
    assert rig.plumbing.rules
    assert await rig.workload_keys()
    assert not rig.plumbing.open_sockets()
    enroller, identities = make_enroller(
        nursery, rig.faults, rig.plumbing, rig.store, rig.state_path
    )
    return Rig(rig.faults, rig.plumbing, rig.store, identities, rig.state_path, enroller)


@pytest.mark.parametrize("step", [s for s in ADD_STEPS if s != "register"])
async def test_failed_adoption_leaves_nothing(rig: Rig, nursery: trio.Nursery, step: str) -> None:
    rig = await restarted(rig, nursery)
    rig.faults.arm(step, "raise")
    if step == "ensure_identity":
        # Not an enrollment error but a bug: it propagates (the agent stops), undone all the
        # same; the record stays for the next start.
        with pytest.raises(RuntimeError):
            await rig.enroller.adopt_all()
        await rig.assert_nothing_left(keep=("on_disk", "state.pods"))
        return
    await rig.enroller.adopt_all()
    assert_fault_fired(rig.faults, step)
    # The pod is un-meshed and forgotten: its old rules and registration are gone too (a netns
    # that cannot be opened is gone, and its rules with it: the fake keeps them).
    await rig.assert_nothing_left(except_="rules" if step == "open_netns" else None)


@pytest.mark.parametrize("step", ADD_STEPS)
async def test_cancelled_adoption_leaves_only_the_record(
    rig: Rig, nursery: trio.Nursery, step: str
) -> None:
    rig = await restarted(rig, nursery)
    with trio.CancelScope() as scope:
        rig.faults.arm(step, "cancel", scope)
        await rig.enroller.adopt_all()
    assert_fault_fired(rig.faults, step)
    if step in AFTER_LAST_CHECKPOINT and not scope.cancelled_caught:
        await rig.assert_enrolled()
        return
    assert scope.cancelled_caught
    # The agent was stopped while starting: the next start re-adopts from the record.
    await rig.assert_nothing_left(keep=("on_disk", "state.pods"))
    assert set(AgentState.load(rig.state_path).pods) == {"u1"}


async def test_adoption_serves_the_pod_while_the_store_fails(
    rig: Rig, nursery: trio.Nursery
) -> None:
    rig = await restarted(rig, nursery)
    await rig.store.delete(keys.workload(NODE, "u1"))  # so its registration is seen anew
    rig.faults.arm("register", "raise")
    await rig.enroller.adopt_all()
    pod = rig.enroller.pods["u1"]
    assert pod.registered is None  # deferred
    assert await rig.workload_keys() == [keys.workload(NODE, "u1")]  # the failed put landed
    await rig.store.delete(keys.workload(NODE, "u1"))
    async with rig.store.watch(keys.WORKLOADS, start_revision=0) as events:
        nursery.start_soon(rig.enroller.maintain_status)
        with trio.fail_after(5):
            batch = await events.__anext__()
    assert [(e.type, e.kv.key) for e in batch] == [("put", keys.workload(NODE, "u1"))]
    assert codec.decode(batch[0].kv)["status"] == {"health": "Unhealthy"}  # no certificate yet
    await rig.assert_enrolled()


async def test_adoption_of_a_gone_pod_forgets_it(rig: Rig, nursery: trio.Nursery) -> None:
    rig = await restarted(rig, nursery)
    rig.plumbing.missing.add("/run/netns/u1")
    await rig.enroller.adopt_all()
    assert rig.plumbing.rules == {"/run/netns/u1"}  # its rules went with the netns in reality
    rig.plumbing.rules.clear()
    await rig.assert_nothing_left()
