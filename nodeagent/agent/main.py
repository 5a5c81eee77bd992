"""`nodeagent run`: start every component under one nursery and report ready when all are up.

Start order matters. Nothing before the pods are served needs the store to answer: the
snapshot comes from the store or, when it does not answer within a few seconds, from the disk
cache; certificates from disk are served while still valid; pods enrolled before a restart are
re-adopted (listeners, rules) without registering. The lease is taken in the background
(`hold_lease` is patient): once held, every workload is registered under it and then the node's
record (`/mesh/v1/nodes/<node>`); a lost lease is replaced and all of it put again. Then the
node's probe SNAT rules (kubelet probes pass STRICT; kept across restarts), the CNI endpoint (so no
new pod is enrolled half-way through re-adoption) and the admin socket, which answers ready last.
While no lease is held, writes that need one (a new pod's registration, a CSR) fail with
LeaseNotHeld, a StoreError their callers retry.

The agent holds `<run-dir>/agent.pid` (nodeagent.agent.pidfile) until it drains, and refuses
to start, or stops instead of registering again, while `nodeagent uninstall` runs.

SIGTERM (or the admin socket's /quitquitquit) hands over to a successor without dropping a
connection (docs/dataplane.md, "Restarts"): the node-level sockets (CNI, admin, 15020) close
and the pid file is released at once, so a new agent can start; the pods' listeners and the
gateway's keep accepting until the successor's admin socket answers ready (it has re-bound
every pod's listeners and the gateway's ports beside ours, SO_REUSEPORT); then they close
(queued connections migrate to the successor's sockets) and open connections get
`--drain-timeout` (5 s, ztunnel's) more before they are closed. When no successor has
started within the drain timeout (a plain stop), listeners and connections close at that
deadline. SIGINT, or a SIGTERM while an uninstall is under way, stops at once.

`--takeover` (a DaemonSet rollout with `maxSurge: 1`, where both pods run at once): a new agent
that finds the run dir held asks the running agent to drain over its admin socket
(`/quitquitquit?then=park`), takes the pid file once it is released, and starts as above. The
old agent hands over, drains, and then parks (serves nothing, holds nothing) until its own
SIGTERM, because an exited container would be restarted by its kubelet and take the node back.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from nodeagent.admin.client import AdminClientError, admin_request
from nodeagent.admin.routes import AdminSources, admin_routes
from nodeagent.agent import pidfile
from nodeagent.agent.enroll import Enroller
from nodeagent.agent.state import AgentState, PodRecord
from nodeagent.authn import Authenticator
from nodeagent.balance import Registry
from nodeagent.cni.metadata import metadata_source
from nodeagent.cni.server import CniServer
from nodeagent.contract import ADMIN_SOCKET_NAME, CNI_SOCKET_NAME, METRICS_PORT, READY_PATH
from nodeagent.gateway import CredentialSource
from nodeagent.gateway.node import NodeGateway
from nodeagent.http import Limits
from nodeagent.httpserver import Handler, Response, Route, UnixSocketHttpServer
from nodeagent.identity.manager import IdentityManager
from nodeagent.inpod import Netns, PodListeners
from nodeagent.inpod.errors import RedirectionError
from nodeagent.inpod.node_rules import aapply_probe_rules, is_probe_target
from nodeagent.log import get_logger
from nodeagent.proxy.inbound import DestinationL7
from nodeagent.proxy.outbound import OutboundPolicy
from nodeagent.snapshot import Snapshot, SnapshotSync, Workload
from nodeagent.store import codec, keys, open_store
from nodeagent.store.base import Store
from nodeagent.store.lease import LeaseNotHeld, hold_lease
from nodeagent.telemetry.metrics import HealthSources
from nodeagent.telemetry.service import Telemetry, TelemetryConfig
from nodeagent.workers.config import WorkerConfig
from nodeagent.workers.feed import DocumentMirror
from nodeagent.workers.remote_pod import RemotePod
from nodeagent.workers.supervisor import WorkerPool

log = get_logger("agent")
# How long start-up waits for the store (its first listing, then the lease) before it serves
# from disk and goes on without it.
STORE_WAIT = 2.0
# How long a drain waits before closing the admin socket: the /quitquitquit answer leaves first.
DRAIN_ANSWER_GRACE = 0.1
# ztunnel's drain period: how long a stopping agent lets its open connections finish.
DRAIN_TIMEOUT = 5.0
# How often a draining agent asks whether its successor answers ready yet.
HANDOVER_POLL = 0.05
# How long a draining agent keeps accepting for a successor that started but is not ready yet.
SUCCESSOR_WAIT = 60.0
# --takeover: how long the new agent waits for the old one to release the pid file (and when
# its handover request got no answer: it may have been taken as the old socket closed).
TAKEOVER_WAIT = 10.0
TAKEOVER_UNANSWERED_WAIT = 3.0
NODE_RECORD_VERSION = 1


def metrics_address(host: str, port: int) -> str:
    """`host:port` of the node's metrics port as the node record says it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class AgentConfig:
    node: str
    store_url: str
    run_dir: Path
    trust_domain: str = "cluster.local"
    log_level: str = "info"
    metrics_port: int = METRICS_PORT
    zipkin_url: str | None = None
    sample_rate: float = 0.01
    # Where pod labels and service accounts come from: "" (CNI runtime args) or "kubernetes"
    # (kube-sync's Pod records in the store).
    pod_metadata: str = ""
    # Unknown destinations: ALLOW_ANY passes them through, REGISTRY_ONLY refuses them (Istio's
    # meshConfig.outboundTrafficPolicy.mode).
    outbound_policy: OutboundPolicy = "ALLOW_ANY"
    # Whether the destination parses every tunnelled request of an HTTP port ("always") or
    # only where a policy reads them or the source did not report them (`parses_requests`).
    destination_l7: DestinationL7 = "always"
    dns: bool = True
    dns_upstreams: tuple[str, ...] = ()  # empty: the node's /etc/resolv.conf
    # Serve the ingress gateway on this node (Gateways selecting `istio: ingressgateway`).
    gateway: bool = False
    gateway_bind: str = "0.0.0.0"
    # The gateway's credentialName source: DIR/<name>/tls.crt, tls.key, ca.crt (docs/gateway.md).
    gateway_credentials: Path | None = None
    # SNAT the node's own TCP to enrolled pods to 169.254.7.127 (kubelet probes pass STRICT).
    probe_snat: bool = True
    # The node's lease: its registrations vanish this long after the agent stops renewing.
    lease_ttl: float = 15.0
    # Other nodes' workloads stay in this agent's snapshot this long after their node's lease
    # lapsed (a store stall longer than the TTL expires every lease; the agents put them back).
    lease_grace: float = 10.0
    # SIGTERM: open connections get this long to finish before they are closed.
    drain_timeout: float = DRAIN_TIMEOUT
    # The HTTP proxies' timeouts and bounds (every pod's and the gateway's).
    http_limits: Limits = field(default_factory=Limits)
    # The node address its metrics port is reachable on, put in the node record for the
    # console (`metrics: "host:port"`); None leaves it out.
    advertise_address: str | None = None
    # Data-plane processes (nodeagent.workers): 1 serves the pods in this process, as before;
    # N > 1 spawns N worker processes that all serve every pod (docs/dataplane.md, Processes).
    workers: int = 1
    log_format: str = "json"  # the workers log like the agent
    # An agent already runs in the run dir: ask it to hand over (drain, then park) and start.
    takeover: bool = False

    @property
    def cni_socket(self) -> Path:
        return self.run_dir / CNI_SOCKET_NAME

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / ADMIN_SOCKET_NAME

    @property
    def state_file(self) -> Path:
        return self.run_dir / "enrolled.msgpack"


@dataclass(slots=True)
class Agent:
    config: AgentConfig
    ready: bool = False
    lease: int = 0
    enroller: Enroller | None = None
    snapshot: SnapshotSync | None = None
    identities: IdentityManager | None = None
    telemetry: Telemetry | None = None
    gateway: NodeGateway | None = None
    # `--workers N > 1`: the worker processes serving every pod's listeners.
    workers: WorkerPool | None = None
    # One balancer registry per agent: every pod's proxy and the gateway share the clusters'
    # latency estimates, ejections and circuit breakers.
    balance: Registry = field(default_factory=Registry)
    # One JWT verifier per agent (RequestAuthentication): every pod's inbound HTTP and the
    # gateway share its JWKS cache.
    authenticator: Authenticator = field(default_factory=Authenticator)
    drain_deadline: float = 0.0
    drain_requested: trio.Event = field(default_factory=trio.Event)
    # After the drain: stay idle until a SIGTERM instead of exiting (taken over by --takeover).
    park_after_drain: bool = False
    # Set once adoption is over: registering under a lease waits for it (every pod is known).
    _adopted: trio.Event = field(default_factory=trio.Event)
    # Set once the first lease is held and everything is registered under it.
    _registered: trio.Event = field(default_factory=trio.Event)
    # The lease everything was last registered under (the admin socket's "registered").
    _registered_lease: int = 0
    _cancel: trio.CancelScope | None = None
    # The node-level servers (CNI, admin): closed first when draining.
    _front: list[trio.CancelScope] = field(default_factory=list)
    _front_running: int = 0
    _pid_file: pidfile.HeldLock | None = None
    # Set when the pods' listeners are closed (the successor serves new connections).
    stopped_accepting: trio.Event = field(default_factory=trio.Event)

    def request_drain(self, deadline: float, park: bool = False) -> None:
        """/quitquitquit: returns at once; run_until_signalled drains and stops the agent (and
        with `park`, then waits for a SIGTERM before the process exits)."""
        self.drain_deadline = deadline
        self.park_after_drain = park
        self.drain_requested.set()

    def open_connections(self) -> dict[str, int]:
        totals = {"inbound": 0, "outbound": 0}
        for pod in self.enroller.pods.values() if self.enroller else ():
            for direction, s in pod.proxy.statistics().items():
                totals[direction] = totals.get(direction, 0) + s["opened"] - s["closed"]
        if self.gateway is not None:
            totals["gateway"] = self.gateway.open_connections()
        return totals

    def _cert_expiry(self) -> dict[str, float]:
        rows = self.identities.certificates() if self.identities else []
        return {
            r["identity"]: datetime.fromisoformat(r["not_after"]).timestamp()
            for r in rows
            if r.get("not_after")
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        cfg.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._pid_file = pidfile.take_agent_pid_file(cfg.run_dir)
        except pidfile.RunDirBusy:
            if not cfg.takeover or pidfile.uninstall_under_way(cfg.run_dir):
                raise
            self._pid_file = await self._take_over()
        try:
            state = AgentState.load(cfg.state_file)
            store = await open_store(cfg.store_url)
            try:
                await self._run(store, state, task_status)
            finally:
                with trio.CancelScope(shield=True):
                    await store.aclose()
        finally:
            self._release_pid_file()

    async def _take_over(self) -> pidfile.HeldLock:
        """Ask the agent holding the run dir to hand over to us (drain, then park), and take
        its pid file once released. RunDirBusy saying why when it does not let go."""
        cfg = self.config
        old = pidfile.running_agent(cfg.run_dir)
        path = f"/quitquitquit?deadline={cfg.drain_timeout:g}&then=park"
        failure = ""
        try:
            with trio.fail_after(5):
                status, body = await admin_request(cfg.admin_socket, "POST", path)
            if status != 200:
                raise pidfile.RunDirBusy(
                    f"the agent (pid {old}) refused the handover: {status} {body!r}", old
                )
        except (AdminClientError, trio.TooSlowError) as exc:
            # The old agent closes its admin socket as it starts to drain, possibly before
            # its answer is out: a failed request may still have been taken. Wait a little.
            failure = str(exc) or "no answer in 5 s"
        log.info("agent.taking_over", old_pid=old, request_failed=failure or None)
        with trio.move_on_after(TAKEOVER_UNANSWERED_WAIT if failure else TAKEOVER_WAIT):
            while True:
                try:
                    return pidfile.take_agent_pid_file(cfg.run_dir)
                except pidfile.RunDirBusy:
                    await trio.sleep(HANDOVER_POLL)
        if failure:
            raise pidfile.RunDirBusy(
                f"an agent (pid {old}) holds {cfg.run_dir} and its admin socket does not take "
                f"the handover: {failure}",
                old,
            )
        raise pidfile.RunDirBusy(
            f"the agent (pid {old}) accepted the handover but kept {cfg.run_dir} for "
            f"{TAKEOVER_WAIT:g} s",
            old,
        )

    def _release_pid_file(self) -> None:
        # Once only: after a handover the path is the successor's file.
        if self._pid_file is not None:
            self._pid_file.release()
            self._pid_file = None

    async def drain(self) -> None:
        """Hand over to a successor and let open connections finish (module docstring);
        returns at the deadline, or earlier once nothing is open. The caller stops the agent."""
        cfg = self.config
        until = trio.current_time() + self.drain_deadline
        self.ready = False  # /healthz/ready answers 503 from now on
        # A drain asked on the admin socket (/quitquitquit, a successor's --takeover) must get
        # its answer out before the admin server closes: cut mid-response, the successor took
        # it for a refusal and exited.
        await trio.sleep(DRAIN_ANSWER_GRACE)
        for scope in self._front:
            scope.cancel()
        if self.telemetry is not None:
            self.telemetry.stop_serving()
        # The servers remove their socket files on the way out: done before the successor
        # may bind its own (after the pid file is released).
        with trio.move_on_after(1.0):
            while self._front_running:  # noqa: ASYNC110 (a few checkpoints, once)
                await trio.sleep(0.01)
        self._release_pid_file()
        log.info("agent.draining", deadline=self.drain_deadline, open=self.open_connections())
        successor = False
        with trio.move_on_at(until):
            while not (successor := await _answers_ready(cfg.admin_socket)):
                if pidfile.uninstall_under_way(cfg.run_dir):
                    log.warning("agent.uninstalled", note="stopping, not draining")
                    return
                await trio.sleep(HANDOVER_POLL)
        if not successor and pidfile.running_agent(cfg.run_dir) is not None:
            # A successor holds the pid file but is still starting (a slow start on a busy
            # node): keep accepting for it while it lives, within a bound.
            with trio.move_on_after(SUCCESSOR_WAIT):
                while pidfile.running_agent(cfg.run_dir) is not None:
                    if successor := await _answers_ready(cfg.admin_socket):
                        break
                    await trio.sleep(HANDOVER_POLL)
        self.stop_accepting()
        if successor:
            # Taken over: open connections get the full drain time from here.
            until = trio.current_time() + self.drain_deadline
        log.info("agent.stopped_accepting", successor=successor, open=self.open_connections())
        with trio.move_on_at(until):
            while True:
                while sum(self.open_connections().values()) > 0:
                    # Polling: connections close inside pod proxies that have no hook to
                    # signal "last one gone", and a drain is rare.
                    if pidfile.uninstall_under_way(cfg.run_dir):
                        log.warning("agent.uninstalled", note="stopping, not draining")
                        return
                    await trio.sleep(0.1)
                if self.workers is None:
                    break
                # The workers' counters are their last reports: believe "nothing open" only
                # from reports sent after every worker closed its listeners.
                with trio.move_on_after(2.0):
                    await self.workers.wait_fresh_reports()
                if sum(self.open_connections().values()) == 0:
                    break
        log.info("agent.drained", open=self.open_connections())

    def stop_accepting(self) -> None:
        """Close every pod's listeners; their open connections go on. A pod enrolled later
        (none: the CNI socket is closed first) would not be covered."""
        for pod in self.enroller.pods.values() if self.enroller else ():
            pod.proxy.close_listeners()
        if self.gateway is not None:
            self.gateway.stop_accepting()
        if self.workers is not None:
            self.workers.stop_accepting()
        self.stopped_accepting.set()

    async def _run(
        self, store: Store, state: AgentState, task_status: trio.TaskStatus[None]
    ) -> None:
        cfg = self.config
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            # Patient: waits for a store that does not answer, registers under every lease it
            # holds (after adoption), replaces a lost one. Not revoked on exit: a restarted
            # agent keeps its pods' registrations.
            nursery.start_soon(
                partial(
                    hold_lease,
                    store,
                    cfg.lease_ttl,
                    reuse=state.lease,
                    on_lease=partial(self._on_lease, store, state),
                    revoke=False,
                )
            )
            self.snapshot = SnapshotSync(
                store,
                cache_path=cfg.run_dir / "snapshot.cache",
                trust_domain=cfg.trust_domain,
                startup_timeout=STORE_WAIT,
                lease_grace=cfg.lease_grace,
            )
            mirror = None
            if cfg.workers > 1:  # the worker processes get the documents as the sync applies them
                mirror = DocumentMirror()
                self.snapshot.add_document_observer(mirror)
            await nursery.start(self.snapshot.run)
            snapshot = self.snapshot
            self.telemetry = Telemetry(
                TelemetryConfig(
                    cfg.node,
                    metrics_port=cfg.metrics_port,
                    zipkin_url=cfg.zipkin_url,
                    sample_rate=cfg.sample_rate,
                ),
                ready=lambda: self.ready,
                health=HealthSources(
                    enrolled_pods=lambda: len(self.enroller.pods) if self.enroller else 0,
                    certificate_expiry=self._cert_expiry,
                    store_revision=lambda: snapshot.current.revision,
                    open_connections=self.open_connections,
                ),
            )
            await nursery.start(self.telemetry.run)
            self.identities = IdentityManager(
                store,
                cfg.node,
                cfg.trust_domain,
                lease=self._held_lease,
                state_dir=cfg.run_dir / "identity",
            )
            await nursery.start(self.identities.run)
            self._follow_node_identities(self.snapshot, self.identities)
            # One JWT verifier for the node (every pod's inbound HTTP and the gateway): one
            # JWKS cache, its remote key sets refreshed in the background.
            await nursery.start(self.authenticator.run)
            pod_server = None
            if mirror is not None:
                self.workers = WorkerPool(
                    cfg.workers,
                    WorkerConfig(
                        node=cfg.node,
                        trust_domain=cfg.trust_domain,
                        outbound_policy=cfg.outbound_policy,
                        destination_l7=cfg.destination_l7,
                        http_limits=cfg.http_limits,
                        zipkin_url=cfg.zipkin_url,
                        sample_rate=cfg.sample_rate,
                        log_level=cfg.log_level,
                        log_format=cfg.log_format,
                    ),
                    self.snapshot,
                    mirror,
                    self.identities,
                )
                await nursery.start(self.workers.run)
                self.telemetry.registry.add_peers(self.workers.metric_states)
                pod_server = partial(_remote_pod, self.workers)
            pods_nursery = await nursery.start(_open_pods_nursery)
            self.enroller = Enroller(
                node=cfg.node,
                store=store,
                state=state,
                metadata=metadata_source(cfg.pod_metadata, store),
                pods_nursery=pods_nursery,
                lease=self._held_lease,
                identities=self.identities,
                snapshot=lambda: snapshot.current,
                outbound_policy=cfg.outbound_policy,
                destination_l7=cfg.destination_l7,
                registry=self.balance,
                dns=cfg.dns,
                dns_upstreams=list(cfg.dns_upstreams) or None,
                telemetry=self.telemetry,
                http_limits=cfg.http_limits,
                authenticator=self.authenticator,
                pod_server=pod_server,
            )
            nursery.start_soon(self._maintain_balance)
            nursery.start_soon(self.enroller.maintain_status)
            enroller = self.enroller
            self.snapshot.add_listener(lambda _: enroller.policy_changed())
            # Registration waits for the lease (`_on_lease`): the pods are served meanwhile.
            await self.enroller.adopt_all(register=False)
            self._adopted.set()
            if not self.snapshot.statistics()["serving_from_cache"]:
                # The store answers: keep the order of a normal start (registered, then ready).
                with trio.move_on_after(STORE_WAIT):
                    await self._registered.wait()
            if cfg.probe_snat:
                # Installed before the CNI socket opens and never removed on exit: probes
                # keep working while the agent restarts; `nodeagent uninstall` removes it.
                await nursery.start(self._maintain_probe_snat, self.snapshot)
            if cfg.gateway:
                self.gateway = NodeGateway(
                    node=cfg.node,
                    store=store,
                    lease=self._held_lease,
                    identities=self.identities,
                    sync=self.snapshot,
                    trust_domain=cfg.trust_domain,
                    bind_host=cfg.gateway_bind,
                    registry=self.balance,
                    sessions=self.enroller.sessions,
                    telemetry=self.telemetry,
                    limits=cfg.http_limits,
                    authenticator=self.authenticator,
                    credentials=CredentialSource(cfg.gateway_credentials),
                    migrate_requests=True,  # handed over at a restart like the pods' listeners
                )
                # Not a front server: it hands over like the pods' listeners (stop_accepting).
                if self._registered.is_set():
                    await nursery.start(self.gateway.run)
                else:  # it registers itself at start: wait for the lease
                    nursery.start_soon(self._start_gateway_when_registered, nursery, self.gateway)
            await nursery.start(self._in_front, CniServer(cfg.cni_socket, self.enroller).run)
            admin = UnixSocketHttpServer(cfg.admin_socket, self._routes())
            await nursery.start(self._in_front, admin.run)
            self.ready = True
            log.info(
                "agent.ready",
                node=cfg.node,
                store=cfg.store_url,
                pods=len(self.enroller.pods),
                run_dir=str(cfg.run_dir),
                lease=self.lease or None,
                snapshot_from=(
                    "cache" if self.snapshot.statistics()["serving_from_cache"] else "store"
                ),
            )
            task_status.started()

    def _held_lease(self) -> int:
        """The lease for writes that must vanish with the agent; LeaseNotHeld before the first."""
        if not self.lease:
            raise LeaseNotHeld(f"{self.config.store_url}: no lease yet (the store did not answer)")
        return self.lease

    async def _start_gateway_when_registered(
        self, nursery: trio.Nursery, gateway: NodeGateway
    ) -> None:
        await self._registered.wait()
        await nursery.start(gateway.run)

    async def _in_front(
        self, run: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run a node-level server until the agent drains (`_front` is cancelled)."""
        scope = trio.CancelScope()
        self._front.append(scope)
        self._front_running += 1
        try:
            with scope:
                await run(task_status=task_status)
        finally:
            self._front_running -= 1

    async def _maintain_balance(self) -> None:
        """Readmit ejected endpoints of clusters without traffic (and log it), about once a
        second; forget the clusters of deleted services."""
        while True:
            await trio.sleep(1.0)
            self.balance.maintain()
            if self.snapshot is not None:
                self.balance.prune(self.snapshot.current)

    async def _maintain_probe_snat(
        self,
        sync: SnapshotSync,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the node's probe SNAT rules (nodeagent.inpod.node_rules) on the addresses of
        this node's registered workloads: applied once before `started` (a failure there stops
        the agent), then again whenever that set changes (a failure is logged and retried with
        the next change, the previous rules stay)."""
        node = self.config.node

        def wanted(snap: Snapshot) -> frozenset[str]:
            # An IPv6, malformed or loopback address in the store must not
            # stop the agent, it just gets no probe SNAT.
            return frozenset(
                a for w in snap.workloads_on_node(node) for a in w.addresses if is_probe_target(a)
            )

        installed = wanted(sync.current)
        await aapply_probe_rules(installed)
        log.info("probe_snat.applied", pods=len(installed))
        changed = trio.Event()
        # The lambda reads the variable, so it sets whichever Event the loop waits on now.
        sync.add_listener(lambda _: changed.set())
        task_status.started()
        while True:
            await changed.wait()
            changed = trio.Event()
            target = wanted(sync.current)
            if target == installed:
                continue
            try:
                await aapply_probe_rules(target)
            except RedirectionError as exc:
                log.error("probe_snat.failed", error=str(exc), pods=len(target))
                continue
            installed = target
            log.info("probe_snat.applied", pods=len(installed))

    async def _on_lease(self, store: Store, state: AgentState, lease: int) -> None:
        """hold_lease holds `lease` (reused from the last run, new, or replacing a lost one):
        remember it for the next run, register every workload under it once adoption is over,
        then the node's record (its deletion tells other agents the lease lapsed; it goes last
        so it never says "live" before the workloads are back). During an uninstall the agent
        stops instead: re-registering would undo it."""
        if pidfile.uninstall_under_way(self.config.run_dir):
            log.warning("agent.uninstalled", lease=lease, note="stopping, not registering")
            if self._cancel is not None:
                self._cancel.cancel()
            await trio.sleep_forever()  # cancelled with the agent
        replaced = bool(self.lease) and self.lease != lease
        self.lease = lease
        if state.lease != lease:
            state.lease = lease
            state.save()
        await self._adopted.wait()
        assert self.enroller is not None  # adoption is over
        if replaced:
            log.warning("lease.replaced", lease=lease, pods=len(self.enroller.pods))
        await self.enroller.reregister_all()
        record: dict[str, object] = {
            "v": NODE_RECORD_VERSION,
            "node": self.config.node,
            "pid": os.getpid(),
            "lease": lease,
        }
        if self.config.advertise_address:
            record["metrics"] = metrics_address(
                self.config.advertise_address, self.config.metrics_port
            )
        await store.put(keys.node(self.config.node), codec.encode(record), lease=lease)
        self._registered_lease = lease
        self._registered.set()
        log.info("lease.registered", lease=lease, pods=len(self.enroller.pods))

    def _follow_node_identities(self, sync: SnapshotSync, identities: IdentityManager) -> None:
        """Keep a certificate for every identity of a workload registered on this node.

        The enroller also calls ensure/release per pod; following the snapshot as well covers
        re-adopted pods and workloads registered by others for this node, and releases an
        identity once no workload of this node has it any more."""
        held: set[str] = set()

        def on_swap(snap: Snapshot) -> None:
            wanted = {w.identity for w in snap.workloads_on_node(self.config.node)}
            for identity in sorted(wanted - held):
                identities.ensure(identity)
            for identity in sorted(held - wanted):
                identities.release(identity)
            held.clear()
            held.update(wanted)

        on_swap(sync.current)
        sync.add_listener(on_swap)

    def _routes(self) -> dict[str, Any]:
        def pods(_: Any) -> Response:
            return Response.json(self.enroller.dump() if self.enroller else [])

        def dump() -> dict[str, Any]:
            snap = self.snapshot.current if self.snapshot else None
            return {
                "node": self.config.node,
                "store": self.config.store_url,
                "ready": self.ready,
                "lease": self.lease,
                # Every workload and the node record are in the store under the current lease.
                "registered": bool(self.lease) and self._registered_lease == self.lease,
                "snapshot": snap.statistics() if snap is not None else None,
                "identity": self.identities.statistics() if self.identities else None,
                "gateway": self.gateway.statistics() if self.gateway else None,
                "balance": self.balance.statistics(),
                # --workers N: the pods' breakers live in the workers (the above is the
                # control's registry: the gateway's).
                "worker_breakers": self.workers.book.breakers() if self.workers else None,
            }

        def workers(_: Any) -> Response:
            return Response.json(
                {
                    "workers": self.config.workers,
                    "processes": self.workers.statistics() if self.workers else [],
                }
            )

        # /config_dump adds "workloads" (the enrolled pods and their state) and "certificates".
        routes: dict[str, Handler | Route] = {"/pods": pods, "/workers": workers}
        routes.update(
            admin_routes(
                AdminSources(
                    ready=lambda: self.ready,
                    config_dump=dump,
                    workloads=lambda: self.enroller.dump() if self.enroller else [],
                    certs=lambda: self.identities.certificates() if self.identities else [],
                    drain=self.request_drain,
                    registry=self.telemetry.registry if self.telemetry else None,
                    log_level=self.config.log_level,
                )
            )
        )
        return routes


def _remote_pod(
    pool: WorkerPool, record: PodRecord, netns: Netns, listeners: PodListeners, workload: Workload
) -> RemotePod:
    return RemotePod(
        pool, uid=record.uid, key=record.key, netns=netns, listeners=listeners, workload=workload
    )


async def _open_pods_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    """A nursery that outlives each CNI call: pod proxies live here until their pod leaves."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


async def _answers_ready(admin_socket: Path) -> bool:
    """Whether an agent (the successor, once ours is closed) answers ready on `admin_socket`."""
    try:
        with trio.move_on_after(1.0):
            status, _ = await admin_request(admin_socket, "GET", READY_PATH)
            return status == 200
    except AdminClientError:
        pass
    return False


async def run_until_signalled(config: AgentConfig) -> None:
    agent = Agent(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)

            async def drain_then_stop() -> None:
                await agent.drain_requested.wait()
                await agent.drain()
                nursery.cancel_scope.cancel()

            nursery.start_soon(drain_then_stop)
            async for signum in signals:
                graceful = signum == signal.SIGTERM and not pidfile.uninstall_under_way(
                    config.run_dir
                )
                if graceful and agent.drain_requested.is_set():
                    # Kubelet's SIGTERM after a preStop `nodeagent admin drain`, or to a pod
                    # taken over: keep draining, then exit (do not park).
                    log.info("agent.draining_already", deadline=agent.drain_deadline)
                    agent.park_after_drain = False
                    continue
                if graceful:
                    agent.request_drain(config.drain_timeout)
                    continue
                log.info("agent.stopping", signal=signal.Signals(signum).name)
                agent.park_after_drain = False
                nursery.cancel_scope.cancel()
                break
        if agent.park_after_drain:
            # Taken over (--takeover): everything is closed and released; an exit now would
            # have the kubelet restart this container, which would take the node back.
            log.info("agent.parked", note="handed over; idle until SIGTERM")
            async for signum in signals:
                log.info("agent.stopping", signal=signal.Signals(signum).name, parked=True)
                break
