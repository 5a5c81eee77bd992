"""A data-plane worker process: `python -m nodeagent.workers.worker FD` (spawned by the
supervisor; FD is its end of the control channel).

It serves every pod the control hands it (`pod_add`: the pod's netns and this worker's own three
SO_REUSEPORT listeners, as descriptors) with the same `PodProxy` the single-process agent runs,
over its own snapshot (built from the control's document stream, `feed.py`), its own identity
provider (the control's material, `identity.py`), its own balancer registry and telemetry sinks.
Every `report_interval` it sends its metrics and per-pod counters. It never opens the store,
never enrolls, and exits when the control's end of the channel closes (the agent stopped or
died: the node then fails closed, like a crashed single-process agent).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from nodeagent import log as logging_setup
from nodeagent.authn import Authenticator
from nodeagent.balance import OutlierEvent, Registry
from nodeagent.balance.registry import log_event
from nodeagent.balance.shared import SharedCounts, SharedCountsError
from nodeagent.inpod import Netns, PodListeners
from nodeagent.log import get_logger
from nodeagent.proxy.pod import PodProxy
from nodeagent.snapshot import Snapshot, SnapshotBuilder, Workload
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry
from nodeagent.telemetry.tracing import Tracer, ZipkinExporter
from nodeagent.tunnel import SessionCache
from nodeagent.workers.channel import Channel, ChannelClosed
from nodeagent.workers.config import ConfigError, WorkerConfig, config_from_wire
from nodeagent.workers.feed import apply_message
from nodeagent.workers.identity import WorkerIdentities
from nodeagent.workers.protocol import Message, ProtocolError

log = get_logger("worker")


@dataclass(slots=True)
class WorkerSinks:
    """`telemetry.dataplane.Sinks` without the 15020 server (the control serves the sum)."""

    registry: MetricsRegistry
    metrics: IstioMetrics
    access_log: AccessLog
    tracer: Tracer
    exporter: ZipkinExporter | None

    @classmethod
    def build(cls, cfg: WorkerConfig) -> WorkerSinks:
        registry = MetricsRegistry()
        exporter = ZipkinExporter(cfg.zipkin_url) if cfg.zipkin_url else None
        return cls(
            registry,
            IstioMetrics(registry),
            AccessLog(),
            Tracer(cfg.node, sample_rate=cfg.sample_rate, exporter=exporter),
            exporter,
        )


@dataclass(slots=True)
class _Pod:
    proxy: PodProxy
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)


class Worker:
    def __init__(
        self,
        channel: Channel,
        slot: int,
        cfg: WorkerConfig,
        *,
        breakers: SharedCounts | None = None,
    ) -> None:
        self.channel = channel
        self.slot = slot
        self.cfg = cfg
        self.builder = SnapshotBuilder(trust_domain=cfg.trust_domain)
        self.snapshot: Snapshot = self.builder.snapshot
        self.identities = WorkerIdentities(cfg.trust_domain)
        self.sinks = WorkerSinks.build(cfg)
        self.registry = Registry(shared=breakers, on_event=self._outlier_event)
        # This worker's ejections, on their way to the control (which tells the others).
        self._ejections_in, self._ejections_out = trio.open_memory_channel[dict[str, Any]](256)
        self.sessions = SessionCache()
        # This worker's JWT verifier (its own JWKS cache: each worker fetches remote key sets).
        self.authenticator = Authenticator()
        self.pods: dict[str, _Pod] = {}
        self._pods_nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._pods_nursery = await nursery.start(_open_nursery)
            await nursery.start(self.sinks.access_log.run)
            await nursery.start(self.authenticator.run)
            if self.sinks.exporter is not None:
                await nursery.start(self.sinks.exporter.run)
            nursery.start_soon(self._report_loop)
            nursery.start_soon(self._forward_ejections)
            nursery.start_soon(self._maintain_balance)
            log.info("worker.started", slot=self.slot, pid=os.getpid())
            try:
                while True:
                    await self._handle(await self.channel.receive())
            except (ChannelClosed, ProtocolError) as exc:
                log.info("worker.exiting", slot=self.slot, reason=str(exc))
            nursery.cancel_scope.cancel()

    async def _handle(self, msg: Message) -> None:
        t = msg.type
        rid = msg.body.get("id")
        try:
            if t in ("snapshot_reset", "snapshot_delta"):
                self.snapshot = apply_message(self.builder, msg.body)
                for pod in self.pods.values():
                    pod.proxy.policy_changed()
            elif t == "identities":
                self.identities.update(msg.body["material"])
            elif t == "pod_add":
                await self._add_pod(msg)
            elif t == "pod_remove":
                await self._remove_pod(str(msg.body["uid"]))
            elif t == "peer_ejected":
                adopted = self.registry.adopt_ejection(
                    _str(msg.body, "cluster"), _str(msg.body, "endpoint"), _int(msg.body, "backoff")
                )
                log.debug("outlier.adopted", cluster=msg.body["cluster"], pickers=adopted)
            elif t == "stop_accepting":
                for pod in self.pods.values():
                    pod.proxy.close_listeners()
            else:
                raise ValueError(f"unknown message type {t!r}")
        except Exception as exc:
            for fd in msg.fds:  # not taken over by a pod
                _close_quietly(fd)
            log.error("worker.message_failed", slot=self.slot, type=t, error=str(exc))
            if rid is not None:
                await self.channel.send({"t": "reply", "id": rid, "error": str(exc)})
            return
        if rid is not None:
            await self.channel.send({"t": "reply", "id": rid})

    async def _add_pod(self, msg: Message) -> None:
        body = msg.body
        uid = str(body["uid"])
        if len(msg.fds) != 4:
            raise ValueError(f"pod_add for {uid}: {len(msg.fds)} descriptors, 4 expected")
        # From here on the descriptors are owned below (closed exactly once, whatever fails).
        netns_fd, *listener_fds = msg.fds
        msg.fds = []
        socks = [socket.socket(fileno=fd) for fd in listener_fds]
        try:
            netns = Netns.from_fd(netns_fd, name=str(body["netns"]))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        finally:
            os.close(netns_fd)
        try:
            if uid in self.pods:
                await self._remove_pod(uid)
            out, inb, tun = (
                trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in socks
            )
            w = dict(body["workload"])
            workload = Workload(**{**w, "addresses": tuple(w["addresses"])})
            proxy = PodProxy(
                str(body["key"]),
                netns,
                PodListeners(netns, out, inb, tun),
                registry=self.registry,
                workload=workload,
                identities=self.identities,
                snapshot=lambda: self.snapshot,
                sessions=self.sessions,
                outbound_policy=self.cfg.outbound_policy,
                destination_l7=self.cfg.destination_l7,
                telemetry=self.sinks,
                http_limits=self.cfg.http_limits,
                authenticator=self.authenticator,
            )
            pod = _Pod(proxy)
            assert self._pods_nursery is not None
            await self._pods_nursery.start(self._serve, pod, netns)
        except BaseException:
            for sock in socks:
                sock.close()
            netns.close()
            raise
        self.pods[uid] = pod

    async def _serve(self, pod: _Pod, netns: Netns, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with pod.scope:
                await pod.proxy.run(task_status=task_status)
        finally:
            netns.close()
            pod.stopped.set()

    async def _remove_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is None:
            return
        pod.scope.cancel()
        with trio.move_on_after(5.0):
            await pod.stopped.wait()

    def _outlier_event(self, event: OutlierEvent) -> None:
        log_event(event)
        if event.kind == "ejected":
            body = {"cluster": event.cluster, "endpoint": event.endpoint, "backoff": event.backoff}
            with contextlib.suppress(trio.WouldBlock):  # 256 queued: the others detect alone
                self._ejections_in.send_nowait({"t": "ejected", **body})

    async def _forward_ejections(self) -> None:
        async for msg in self._ejections_out:
            await self.channel.send(msg)

    async def _report_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.report_interval)
            await self.channel.send(self.report())

    def report(self) -> dict[str, Any]:
        return {
            "t": "report",
            "metrics": self.sinks.registry.state(),
            "pods": {uid: p.proxy.statistics() for uid, p in self.pods.items()},
            "pools": {uid: p.proxy.pool_statistics() for uid, p in self.pods.items()},
            "revision": self.builder.revision,
            "identity": self.identities.statistics(),
            "breakers": self.registry.breaker_statistics(),
        }

    async def _maintain_balance(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.registry.maintain()
            self.registry.prune(self.snapshot)


async def _open_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is {value!r}, not a non-empty string")
    return value


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} is {value!r}, not an int >= 0")
    return value


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


async def _main(fd: int) -> None:
    channel = Channel(socket.socket(fileno=fd))
    hello = await channel.receive()
    if hello.type != "hello":
        raise SystemExit(f"worker: first message is {hello.type!r}, not hello")
    try:
        cfg = config_from_wire(hello.body.get("config"))
    except ConfigError as exc:
        raise SystemExit(f"worker: bad config in hello: {exc}") from None
    slot = hello.body.get("slot")
    if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
        raise SystemExit(f"worker: bad slot in hello: {slot!r}")
    logging_setup.configure(cfg.log_level, "console" if cfg.log_format == "console" else "json")
    breakers_fd = hello.body.get("breakers_fd")
    if not isinstance(breakers_fd, int) or isinstance(breakers_fd, bool):
        raise SystemExit(f"worker: bad breakers_fd in hello: {breakers_fd!r}")
    try:
        breakers = SharedCounts.attach(breakers_fd, slot)
    except (OSError, SharedCountsError) as exc:
        raise SystemExit(f"worker: the breaker table (fd {breakers_fd}): {exc}") from None
    await Worker(channel, slot, cfg, breakers=breakers).run()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m nodeagent.workers.worker FD", file=sys.stderr)
        return 2
    # No PR_SET_PDEATHSIG: it fires when the parent *thread* exits, and trio spawns from a
    # cached worker thread. The channel's EOF is the signal instead: the kernel closes the
    # control's end when the control process dies, however it dies.
    # SIGINT/SIGTERM go to the whole process group in a terminal or sandbox: the control
    # decides when a worker stops (it closes the channel), so ignore them here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    trio.run(_main, int(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
