"""`WorkerPool`: the control process's side of `--workers N`: spawn the workers, keep each one
configured (snapshot stream, identity material, every pod's listeners), respawn a worker that
dies, and keep what they report (`metrics.WorkerBook`).

Per pod and per worker the control binds a fresh set of the pod's three listeners inside the
pod's netns (SO_REUSEPORT: one reuse group per port holds one socket per worker, so the kernel
spreads new connections) and passes them with the netns to that worker; once the worker says it
serves them, the control closes its own copies, so a worker that dies takes its sockets with it
(with `tcp_migrate_req` their queued connections move to the other workers' sockets) and only
its own open connections fail. The replacement worker gets the whole current state again:
everything the snapshot stream sent so far, the identity material, a new set of listeners for
every pod. Respawns back off (0.1 s doubling to 5 s) while a worker keeps dying young.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from nodeagent.balance.shared import SharedCounts
from nodeagent.inpod import Netns, bind_listeners
from nodeagent.log import get_logger
from nodeagent.snapshot import SnapshotSync, Workload
from nodeagent.telemetry.merge import FamilyState
from nodeagent.workers.channel import Channel, ChannelClosed
from nodeagent.workers.config import WorkerConfig, config_to_wire
from nodeagent.workers.feed import DocumentMirror
from nodeagent.workers.metrics import PodStats, WorkerBook, WorkerReport
from nodeagent.workers.protocol import ProtocolError

log = get_logger("workers")

REQUEST_TIMEOUT = 15.0
RESPAWN_INITIAL = 0.1
RESPAWN_MAX = 5.0
# A worker that lived this long before dying is respawned at once.
HEALTHY_AGE = 10.0
STOP_TIMEOUT = 2.0
# A worker that has not taken a stream message within this is stuck: killed (and respawned)
# rather than holding the snapshot and identity streams of every worker back.
SEND_TIMEOUT = 10.0


class WorkerError(Exception):
    """A worker refused or failed a request (the message says which pod and why)."""


class WorkerGone(WorkerError):
    """The worker died before it answered: its replacement gets the whole state anyway."""


class IdentitySource(Protocol):
    def material(self) -> dict[str, Any]: ...

    async def wait_changed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PodHandle:
    uid: str
    key: str  # namespace/name
    netns: Netns
    workload: Workload


@dataclass(slots=True)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


@dataclass(slots=True)
class Slot:
    index: int
    incarnation: int = 0
    restarts: int = 0
    pid: int | None = None
    process: trio.Process | None = None
    channel: Channel | None = None
    up: bool = False  # configured: receives the snapshot and identity streams
    started_at: float = 0.0
    lock: trio.Lock = field(default_factory=trio.Lock)
    given: set[str] = field(default_factory=set)  # pods this incarnation serves
    pending: dict[int, _Pending] = field(default_factory=dict)
    revision: int = 0
    identity: dict[str, Any] = field(default_factory=dict)
    reports: int = 0  # received from this incarnation
    last_exit: int | None = None


class WorkerPool:
    def __init__(
        self,
        count: int,
        config: WorkerConfig,
        sync: SnapshotSync,
        mirror: DocumentMirror,
        identities: IdentitySource | None,
        *,
        command: Callable[[int], list[str]] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"--workers {count}: at least one worker")
        self.config = config
        self.sync = sync
        self.identities = identities
        self.slots = [Slot(i) for i in range(count)]
        self.book = WorkerBook()
        self.pods: dict[str, PodHandle] = {}
        self.draining = False
        self._command = command or _worker_command
        self._mirror = mirror  # observes `sync`: added before the sync ran
        self._feed_lock = trio.Lock()
        self._material: dict[str, Any] | None = None
        self._snapshot_changed = trio.Event()
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._stopped_accepting = trio.Event()  # every worker answered stop_accepting
        self._reported = trio.Event()  # set (and replaced) at every report
        # The circuit-breaker counts every worker maps: a limit bounds the node's sum.
        self.breakers = SharedCounts.create(count)

    # -- the component --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker and return `started` once each serves (configured)."""
        try:
            await self._run(task_status)
        finally:
            self.breakers.close()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.sync.add_listener(lambda _: self._snapshot_changed.set())
            for slot in self.slots:
                await nursery.start(self._keep_running, slot)
            nursery.start_soon(self._stream_snapshots)
            if self.identities is not None:
                nursery.start_soon(self._stream_identities, self.identities)
            log.info("workers.started", workers=len(self.slots))
            task_status.started()

    # -- what the enroller asks -----------------------------------------------------------------

    async def add_pod(self, pod: PodHandle) -> list[tuple[str, str]]:
        """Have every worker serve `pod`; the addresses bound. All or nothing: a worker's
        refusal removes it from the others and raises WorkerError (a worker that dies meanwhile
        is not a refusal: its replacement gets the pod)."""
        self.pods[pod.uid] = pod
        addresses: list[tuple[str, str]] = []
        try:
            for slot in self.slots:
                async with slot.lock:
                    if slot.up and pod.uid not in slot.given:
                        try:
                            addresses = await self._give(slot, pod)
                        except WorkerGone:
                            continue
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove_pod(pod.uid)
            raise
        return addresses

    async def remove_pod(self, uid: str) -> None:
        self.pods.pop(uid, None)
        for slot in self.slots:
            async with slot.lock:
                if uid in slot.given:
                    slot.given.discard(uid)
                    try:
                        await self._request(slot, {"t": "pod_remove", "uid": uid})
                    except WorkerGone:
                        pass  # its sockets went with it
                    except WorkerError as exc:
                        log.warning(
                            "workers.remove_failed", slot=slot.index, pod=uid, error=str(exc)
                        )
        self.book.forget_pod(uid)

    def stop_accepting(self) -> None:
        """Every worker closes every pod's listeners (the agent drains); no more respawns."""
        self.draining = True
        if self._nursery is not None:
            self._nursery.start_soon(self._stop_accepting_one_by_one)

    async def _stop_accepting_one_by_one(self) -> None:
        """One worker at a time, each after the previous one answered: a closing listener's
        queued connections migrate (tcp_migrate_req) to another socket of its reuse group, and
        one that migrates to a socket closing at the same moment can be reset."""
        for slot in self.slots:
            try:
                await self._request(slot, {"t": "stop_accepting"})
            except WorkerError as exc:
                log.warning("workers.stop_accepting_failed", slot=slot.index, error=str(exc))
        self._stopped_accepting.set()

    async def wait_fresh_reports(self) -> None:
        """Return once every live worker has reported after now (and, when draining, after it
        stopped accepting): its counters then include every connection it accepted. The
        caller bounds the wait (a stuck worker would never report)."""
        if self.draining:
            await self._stopped_accepting.wait()
        seen = {s.index: (s.incarnation, s.reports) for s in self.slots if s.up}
        while any(
            s.up and (s.incarnation, s.reports) <= seen[s.index]
            for s in self.slots
            if s.index in seen
        ):
            await self._reported.wait()

    # -- what the agent shows -------------------------------------------------------------------

    def pod_statistics(self, uid: str) -> PodStats:
        return self.book.pod_statistics(uid)

    def pool_statistics(self, uid: str) -> dict[str, int]:
        return self.book.pool_statistics(uid)

    def metric_states(self) -> list[list[FamilyState]]:
        return self.book.metric_states()

    def statistics(self) -> list[dict[str, Any]]:
        rows = []
        for slot in self.slots:
            report = self.book.live.get(slot.index)
            rows.append(
                {
                    "slot": slot.index,
                    "pid": slot.pid,
                    "up": slot.up,
                    "incarnation": slot.incarnation,
                    "restarts": slot.restarts,
                    "last_exit": slot.last_exit,
                    "pods": len(slot.given),
                    "connections": report.connections() if report else 0,
                    "reports": slot.reports,
                    "snapshot_revision": slot.revision,
                    "identity": slot.identity,
                }
            )
        return rows

    # -- one worker's life ----------------------------------------------------------------------

    async def _keep_running(
        self, slot: Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        backoff = RESPAWN_INITIAL
        first = True
        while True:
            started = time.monotonic()
            served = await self._incarnation(
                slot, task_status if first else trio.TASK_STATUS_IGNORED
            )
            if first and not served:  # start-up fails loudly rather than retrying blind
                raise WorkerError(
                    f"worker {slot.index} (pid {slot.pid}) exited with {slot.last_exit} "
                    "before it served (its log lines are in the agent's stderr)"
                )
            first = False
            if self.draining:
                return
            if time.monotonic() - started >= HEALTHY_AGE:
                backoff = RESPAWN_INITIAL
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESPAWN_MAX)
            slot.restarts += 1

    async def _incarnation(self, slot: Slot, task_status: trio.TaskStatus[None]) -> bool:
        """One worker process from spawn to burial; whether it got to serve."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await trio.lowlevel.open_process(
                self._command(child.fileno()), pass_fds=(child.fileno(), self.breakers.fd)
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        channel = Channel(parent)
        slot.incarnation += 1
        slot.pid, slot.channel, slot.started_at = proc.pid, channel, time.monotonic()
        slot.process = proc
        slot.given = set()
        slot.reports = 0
        served = False
        try:
            async with trio.open_nursery() as nursery:

                async def watch_process() -> None:
                    await proc.wait()
                    nursery.cancel_scope.cancel()

                async def read() -> None:
                    await self._read(slot, channel)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_process)
                nursery.start_soon(read)
                await self._configure(slot, channel)
                log.info(
                    "worker.serving",
                    slot=slot.index,
                    pid=proc.pid,
                    incarnation=slot.incarnation,
                    pods=len(slot.given),
                )
                served = True
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._bury(slot, channel, proc)
        return served

    async def _configure(self, slot: Slot, channel: Channel) -> None:
        hello = {
            "t": "hello",
            "slot": slot.index,
            "config": config_to_wire(self.config),
            "breakers_fd": self.breakers.fd,
        }
        await channel.send(hello)
        async with self._feed_lock:
            await self._flush_snapshot()  # the others are up to date: then this one starts
            await channel.send(self._mirror.full())
            if self.identities is not None:
                self._material = self.identities.material()
                await channel.send({"t": "identities", "material": self._material})
            slot.up = True
        async with slot.lock:
            for pod in list(self.pods.values()):
                if pod.uid in slot.given:
                    continue
                try:
                    await self._give(slot, pod)
                except WorkerGone:
                    raise
                except WorkerError as exc:  # the pod's netns went away meanwhile, …
                    log.error("worker.pod_failed", slot=slot.index, pod=pod.key, error=str(exc))

    async def _bury(self, slot: Slot, channel: Channel, proc: trio.Process) -> None:
        slot.up = False
        slot.channel = None
        slot.process = None
        channel.close()  # a live worker exits on EOF
        with trio.move_on_after(STOP_TIMEOUT):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        slot.last_exit = proc.returncode
        self.breakers.clear_column(slot.index)  # its connections and requests died with it
        for pending in slot.pending.values():
            pending.error = "the worker died"
            pending.done.set()
        slot.pending.clear()
        slot.given = set()
        self.book.retire(slot.index)
        if not self.draining and self._nursery is not None:
            log.warning(
                "worker.died",
                slot=slot.index,
                pid=proc.pid,
                returncode=proc.returncode,
                lived_s=round(time.monotonic() - slot.started_at, 3),
            )

    async def _read(self, slot: Slot, channel: Channel) -> None:
        try:
            while True:
                msg = await channel.receive()
                if msg.type == "report":
                    self.book.report(slot.index, WorkerReport.from_message(msg.body))
                    slot.reports += 1
                    reported, self._reported = self._reported, trio.Event()
                    reported.set()
                    slot.revision = int(msg.body.get("revision") or 0)
                    slot.identity = dict(msg.body.get("identity") or {})
                elif msg.type == "ejected" and self._nursery is not None:
                    # An outlier ejection: every other worker ejects the endpoint too.
                    peer = {**msg.body, "t": "peer_ejected"}
                    self._nursery.start_soon(self._tell_others, slot.index, peer)
                elif msg.type == "reply":
                    pending = slot.pending.pop(int(msg.body["id"]), None)
                    if pending is not None:
                        pending.error = msg.body.get("error")
                        pending.done.set()
                else:
                    log.warning("worker.unexpected", slot=slot.index, type=msg.type)
        except (ChannelClosed, ProtocolError) as exc:
            log.info("worker.channel_closed", slot=slot.index, reason=str(exc))

    # -- requests -------------------------------------------------------------------------------

    async def _give(self, slot: Slot, pod: PodHandle) -> list[tuple[str, str]]:
        """Bind a new listener set for `slot` in the pod's netns, hand it over, close ours."""
        listeners = bind_listeners(pod.netns)
        try:
            addresses = []
            for role, listener in zip(
                ("outbound", "inbound-plaintext", "tunnel"), listeners.all(), strict=True
            ):
                host, port = listener.socket.getsockname()[:2]
                addresses.append((role, f"{host}:{port}"))
            fds = [pod.netns.fd, *(lst.socket.fileno() for lst in listeners.all())]
            body = {
                "t": "pod_add",
                "uid": pod.uid,
                "key": pod.key,
                "netns": pod.netns.name,
                "workload": workload_fields(pod.workload),
            }
            await self._request(slot, body, fds)
            slot.given.add(pod.uid)
            return addresses
        finally:
            listeners.close()  # the worker holds its own copies now

    async def _request(
        self, slot: Slot, body: dict[str, Any], fds: list[int] | None = None
    ) -> None:
        channel = slot.channel
        if channel is None:
            raise WorkerGone(f"worker {slot.index} is not running")
        rid = next(self._ids)
        pending = slot.pending[rid] = _Pending()
        try:
            await channel.send({**body, "id": rid}, fds or ())
        except ChannelClosed:
            slot.pending.pop(rid, None)
            raise WorkerGone(f"worker {slot.index} died") from None
        with trio.move_on_after(REQUEST_TIMEOUT) as timeout:
            await pending.done.wait()
        if timeout.cancelled_caught:
            slot.pending.pop(rid, None)
            raise WorkerError(
                f"worker {slot.index}: no answer to {body['t']} in {REQUEST_TIMEOUT}s"
            )
        if pending.error == "the worker died":
            raise WorkerGone(f"worker {slot.index} died")
        if pending.error is not None:
            raise WorkerError(f"worker {slot.index}: {body['t']}: {pending.error}")

    # -- the streams ----------------------------------------------------------------------------

    async def _stream(self, slot: Slot, msg: dict[str, Any]) -> None:
        """Send a stream message to `slot` if it is up; a stuck worker is killed (its
        replacement gets a reset), a dead one skipped."""
        channel, proc = slot.channel, slot.process
        if not slot.up or channel is None:
            return
        with trio.move_on_after(SEND_TIMEOUT) as stuck:
            with contextlib.suppress(ChannelClosed):
                await channel.send(msg)
        if stuck.cancelled_caught and proc is not None and proc.returncode is None:
            log.error("worker.stuck", slot=slot.index, pid=proc.pid, type=msg.get("t"))
            proc.kill()

    async def _tell_others(self, index: int, msg: dict[str, Any]) -> None:
        for slot in self.slots:
            if slot.index != index:
                await self._stream(slot, msg)

    async def _flush_snapshot(self) -> None:
        """Under `_feed_lock`: send what changed since the last message to every worker up."""
        for msg in self._mirror.take():
            for slot in self.slots:
                await self._stream(slot, msg)

    async def _stream_snapshots(self) -> None:
        while True:
            await self._snapshot_changed.wait()
            self._snapshot_changed = trio.Event()
            async with self._feed_lock:
                await self._flush_snapshot()

    async def _stream_identities(self, identities: IdentitySource) -> None:
        while True:
            material = identities.material()
            if material != self._material:
                async with self._feed_lock:
                    self._material = material
                    for slot in self.slots:
                        await self._stream(slot, {"t": "identities", "material": material})
            await identities.wait_changed()


def workload_fields(w: Workload) -> dict[str, Any]:
    """The enrolled pod as the enroller made it (`Enroller.workload_of`), as plain data."""
    return {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "node": w.node,
        "addresses": list(w.addresses),
        "labels": dict(w.labels),
        "annotations": dict(w.annotations),
        "service_account": w.service_account,
        "identity": w.identity,
    }


def _worker_command(fd: int) -> list[str]:
    return [sys.executable, "-m", "nodeagent.workers.worker", str(fd)]
