"""The enroller with a `pod_server` factory (what `--workers N` plugs in): the server it builds
serves the pod; one that refuses (a worker's refusal) undoes the whole enrollment; DEL stops it.
Runs without root against `fake_plumbing.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

from nodeagent.agent.enroll import Enroller, PodServer
from nodeagent.agent.state import PodRecord
from nodeagent.cni.errors import ErrorCode
from nodeagent.cni.metadata import RuntimeArgsMetadataSource
from nodeagent.cni.protocol import Command, EnrollError
from nodeagent.inpod import Netns, PodListeners
from nodeagent.snapshot import Workload
from nodeagent.store import keys
from nodeagent.workers.supervisor import WorkerError


class FakeServer:
    def __init__(self, listeners: PodListeners, *, refuse: bool) -> None:
        self.listeners = listeners
        self.refuse = refuse
        self.running = False
        self.stopped = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.refuse:
            raise WorkerError("worker 1: pod_add: bind 15001 in netns x: address in use")
        self.running = True
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.stopped = True

    def statistics(self) -> dict[str, Any]:
        return {"outbound": {"opened": 7, "closed": 7}, "inbound": {"opened": 0, "closed": 0}}

    def pool_statistics(self) -> dict[str, int]:
        return {"connections": 1}

    def listener_addresses(self) -> list[tuple[str, str]]:
        return [("outbound", "0.0.0.0:15001")]

    def close_listeners(self) -> None:
        self.listeners.close()

    def policy_changed(self) -> None:
        pass


async def _enroller(
    tmp_path: Path, nursery: trio.Nursery, refuse: bool
) -> tuple[Enroller, FakePlumbing, FaultyStore, list[FakeServer]]:
    faults = Faults()
    plumbing = FakePlumbing(faults)
    store = FaultyStore(faults)
    state = FaultyState.load(tmp_path / "enrolled.msgpack")
    assert isinstance(state, FaultyState)
    state.faults = faults
    built: list[FakeServer] = []

    def factory(record: PodRecord, netns: Netns, listeners: PodListeners, w: Workload) -> PodServer:
        assert w.uid == record.uid
        server = FakeServer(listeners, refuse=refuse)
        built.append(server)
        return server

    enroller = Enroller(
        node=NODE,
        store=store,
        state=state,
        metadata=RuntimeArgsMetadataSource(),
        pods_nursery=nursery,
        lease=lambda: 0,
        identities=FakeIdentities(faults),
        plumbing=plumbing,
        pod_server=factory,
    )
    return enroller, plumbing, store, built


async def test_the_factory_serves_the_pod_and_del_stops_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    enroller, plumbing, store, built = await _enroller(tmp_path, nursery, refuse=False)
    try:
        assert await enroller.add(request())
        (server,) = built
        assert server.running
        dump = enroller.dump()[0]
        assert dump["connections"]["outbound"]["opened"] == 7  # the server's counters
        assert {"role": "outbound", "protocol": "tcp", "address": "0.0.0.0:15001"} in dump[
            "listeners"
        ]
        await enroller.delete(request(Command.DEL))
        assert server.stopped
        assert plumbing.open_sockets() == []
        assert enroller.pods == {}
    finally:
        await store.aclose()


async def test_a_refusing_server_undoes_the_enrollment(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    enroller, plumbing, store, built = await _enroller(tmp_path, nursery, refuse=True)
    try:
        with pytest.raises(EnrollError, match="pod default/web: worker 1: pod_add: bind") as info:
            await enroller.add(request())
        assert info.value.code == ErrorCode.ENROLL_FAILED
        assert len(built) == 1
        assert plumbing.open_sockets() == []
        assert plumbing.open_netns_handles() == []
        assert set(plumbing.rules) == set()
        kvs, _ = await store.range(keys.WORKLOADS)
        assert kvs == []
        assert enroller.pods == {}
    finally:
        await store.aclose()
