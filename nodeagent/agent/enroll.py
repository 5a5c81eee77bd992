"""Enrollment: the agent's side of each CNI call, and re-adoption after a restart.

For every pod, in this order: open its netns, bind the agent's listeners there and start
serving them, install the redirection rules, register the pod as a Workload under the agent's
lease, start obtaining its identity's certificate (after the registration, so the CA's first
answer is a certificate, not a refusal), then record it in the agent's maps and on disk. Each
step's undo is registered before the step runs (every undo is a no-op for a step that did not
happen), and any failure or cancellation runs them in reverse, shielded: a pod is either fully
meshed or untouched. DEL undoes it all, shielded, and never fails for a pod that is already gone.

The Workload carries a status (ztunnel's HEALTHY/UNHEALTHY): Unhealthy until the identity
manager holds a valid certificate for its identity, so peers do not pick a pod whose agent cannot
terminate mTLS for it yet; `maintain_status` keeps it current (a certificate issued, expired).
Everything enrollment does to the pod's netns goes through `PodPlumbing` (`plumbing.py`).

Each pod's proxy gets what the data plane needs: the pod as a Workload (its SPIFFE identity),
the identity provider (`ensure` on enroll, `release` when the last pod of an identity leaves),
the snapshot, and the node-wide endpoint picker and TLS session cache.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from nodeagent.agent.plumbing import InpodPlumbing, PodPlumbing
from nodeagent.agent.state import AgentState, PodRecord
from nodeagent.authn import Authenticator
from nodeagent.balance import Registry
from nodeagent.cni.errors import ErrorCode
from nodeagent.cni.metadata import PodMetadataSource
from nodeagent.cni.protocol import CniRequest, EnrollError
from nodeagent.dns import DnsError, DnsProxy
from nodeagent.http import Limits
from nodeagent.identity.api import IdentityProvider
from nodeagent.inpod import InpodError, Netns, PodListeners, RedirectionSpec
from nodeagent.log import get_logger
from nodeagent.proxy.inbound import (
    DestinationL7,
    destination_l7_annotation,
    destination_l7_of,
)
from nodeagent.proxy.outbound import OutboundPolicy
from nodeagent.proxy.pod import PodProxy
from nodeagent.snapshot import HEALTHY, UNHEALTHY, Snapshot, Workload, WorkloadStatus
from nodeagent.store import codec, keys
from nodeagent.store.base import Store, StoreError
from nodeagent.telemetry.dataplane import Sinks
from nodeagent.tunnel import SessionCache
from nodeagent.workers.supervisor import WorkerError

log = get_logger("agent.enroll")

OPT_OUT_LABEL = "istio.io/dataplane-mode"
WORKLOAD_API = "mesh.nodeagent.io/v1alpha1"
# How often `maintain_status` re-checks without being woken (a missed wake-up costs this much).
STATUS_POLL = 1.0
STATUS_RETRY = 1.0
STOP_TIMEOUT = 5.0
Undo = Callable[[], Awaitable[None]]


class PodServer(Protocol):
    """What serves one enrolled pod's capture listeners: a `PodProxy` in this process, or a
    `workers.RemotePod` whose worker processes do (`nodeagent run --workers N`)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `started` once the pod is served."""

    def statistics(self) -> dict[str, Any]: ...

    def pool_statistics(self) -> dict[str, int]:
        """The pod's HBONE pool (`TunnelPool.statistics()`; summed over the workers)."""

    def listener_addresses(self) -> list[tuple[str, str]]: ...

    def close_listeners(self) -> None: ...

    def policy_changed(self) -> None: ...


# Builds the PodServer of a pod whose listeners were just bound (replaces the in-process
# PodProxy): (record, netns, listeners, workload) → server.
PodServerFactory = Callable[[PodRecord, Netns, PodListeners, Workload], PodServer]


class NodeIdentities(IdentityProvider, Protocol):
    def can_serve(self, identity: str) -> bool:
        """Whether a valid certificate (and the trust bundle) for `identity` is held now, i.e.
        whether the agent can terminate mTLS for a workload with it."""


@dataclass(slots=True)
class EnrolledPod:
    record: PodRecord
    netns: Netns
    proxy: PodServer
    dns: DnsProxy | None = None
    identity: str = ""  # the pod's SPIFFE id
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    serving: bool = False  # the serving task has started (and will set `stopped`)
    stopped: trio.Event = field(default_factory=trio.Event)  # set when serving has ended
    state: str = "enrolled"
    registered: WorkloadStatus | None = None  # the status last written to the store

    def listeners(self) -> list[dict[str, Any]]:
        """What the agent serves inside this pod's netns, as bound."""
        rows = [
            {"role": role, "protocol": "tcp", "address": address}
            for role, address in self.proxy.listener_addresses()
        ]
        if self.dns is not None:
            for proto, addr in (("udp", self.dns.udp_address), ("tcp", self.dns.tcp_address)):
                if addr is not None:
                    rows.append(
                        {"role": "dns", "protocol": proto, "address": f"{addr[0]}:{addr[1]}"}
                    )
        return rows

    def dump(self) -> dict[str, Any]:
        r = self.record
        return {
            "uid": r.uid,
            "namespace": r.namespace,
            "name": r.name,
            "container_id": r.container_id,
            "netns": r.netns,
            "addresses": list(r.addresses),
            "service_account": r.service_account,
            "labels": r.labels,
            "state": self.state,
            "status": self.registered,
            "listeners": self.listeners(),
            "connections": self.proxy.statistics(),
            "tunnel_pool": self.proxy.pool_statistics(),
        }


def workload_document(
    node: str, record: PodRecord, status: WorkloadStatus = HEALTHY
) -> dict[str, Any]:
    return {
        "apiVersion": WORKLOAD_API,
        "kind": "Workload",
        "metadata": {
            "name": record.name,
            "namespace": record.namespace,
            "uid": record.uid,
            "labels": record.labels,
            "annotations": record.annotations,
        },
        "spec": {
            "node": node,
            "addresses": list(record.addresses),
            "serviceAccount": record.service_account,
        },
        "status": {"health": status},
    }


def pod_addresses(prev_result: dict[str, Any] | None) -> tuple[str, ...]:
    """The pod's IPs from the primary CNI's result (`ips[].address` is a CIDR)."""
    if not prev_result:
        raise EnrollError(
            ErrorCode.INVALID_CONFIG, "no prevResult: mesh-cni must run after the primary CNI"
        )
    out = []
    for entry in prev_result.get("ips") or []:
        try:
            out.append(str(ipaddress.ip_interface(entry["address"]).ip))
        except (KeyError, TypeError, ValueError) as exc:
            raise EnrollError(
                ErrorCode.INVALID_CONFIG, f"prevResult.ips entry {entry!r}: {exc}"
            ) from None
    if not out:
        raise EnrollError(ErrorCode.INVALID_CONFIG, "prevResult has no IP address for the pod")
    return tuple(out)


class Enroller:
    """Implements the CNI handler for the agent; owns the set of enrolled pods."""

    def __init__(
        self,
        *,
        node: str,
        store: Store,
        state: AgentState,
        metadata: PodMetadataSource,
        pods_nursery: trio.Nursery,
        lease: Callable[[], int],
        identities: NodeIdentities | None = None,
        snapshot: Callable[[], Snapshot] | None = None,
        outbound_policy: OutboundPolicy = "ALLOW_ANY",
        destination_l7: DestinationL7 = "always",
        registry: Registry | None = None,
        dns: bool = True,
        dns_upstreams: Sequence[str] | None = None,
        telemetry: Sinks | None = None,
        plumbing: PodPlumbing | None = None,
        http_limits: Limits | None = None,
        authenticator: Authenticator | None = None,
        pod_server: PodServerFactory | None = None,
    ) -> None:
        self.node = node
        # The node's one JWT verifier (one JWKS cache) for every pod's inbound HTTP.
        self.authenticator = authenticator if authenticator is not None else Authenticator()
        # None: each pod's PodProxy runs in this process.
        self.pod_server = pod_server
        self.http_limits = http_limits  # every pod's L7 proxy (agent flags)
        self.telemetry = telemetry  # metrics, access log and tracer for every pod's proxy
        # The in-pod DNS proxy (15053) for pods whose spec captures DNS; upstreams default to
        # the node's resolv.conf.
        self.dns = dns
        self.dns_upstreams = dns_upstreams
        self.identities = identities
        self.snapshot: Callable[[], Snapshot] = snapshot if snapshot is not None else Snapshot.empty
        self.outbound_policy: OutboundPolicy = outbound_policy
        self.destination_l7: DestinationL7 = destination_l7
        self.registry = registry if registry is not None else Registry()  # the node's balancer
        self.sessions = SessionCache()  # shared by every pod: keyed by source identity
        self.store = store
        self.state = state
        self.metadata = metadata
        self.plumbing: PodPlumbing = plumbing if plumbing is not None else InpodPlumbing()
        self._nursery = pods_nursery
        self._lease = lease
        self.pods: dict[str, EnrolledPod] = {}
        self._locks: dict[str, trio.Lock] = {}

    # -- the CNI handler --------------------------------------------------------------------

    async def add(self, req: CniRequest) -> bool:
        async with self._lock(req.pod.uid):
            current = self.pods.get(req.pod.uid)
            if current is not None:
                if current.record.container_id == req.container_id:
                    return True  # a retried ADD for a pod that is already meshed
                await self._teardown(current, reason="replaced by a new sandbox")
            meta = await self.metadata.lookup(req)
            if meta.labels.get(OPT_OUT_LABEL) == "none":
                log.info(
                    "enroll.skipped",
                    pod=f"{req.pod.namespace}/{req.pod.name}",
                    reason=OPT_OUT_LABEL,
                )
                return False
            addresses = pod_addresses(req.prev_result)  # before opening anything
            try:
                netns = self.plumbing.open_netns(req.netns)
            except InpodError as exc:
                raise EnrollError(ErrorCode.CONTAINER_UNKNOWN, str(exc)) from None
            record = PodRecord(
                uid=req.pod.uid,
                namespace=req.pod.namespace,
                name=req.pod.name,
                container_id=req.container_id,
                netns=req.netns,
                netns_id=netns.identity,
                addresses=addresses,
                service_account=meta.service_account,
                labels=dict(meta.labels),
                annotations=dict(meta.annotations),
            )
            await self._enroll(record, netns)
            return True

    async def delete(self, req: CniRequest) -> None:
        async with self._lock(req.pod.uid):
            pod = self.pods.get(req.pod.uid)
            if pod is None:
                pod = next(
                    (p for p in self.pods.values() if p.record.container_id == req.container_id),
                    None,
                )
            if pod is not None:
                await self._teardown(pod, reason="CNI DEL")
            elif req.pod.uid in self.state.pods:  # known on disk but not live: clean the record
                with trio.CancelScope(shield=True):
                    await self._forget(self.state.pods[req.pod.uid])

    async def check(self, req: CniRequest) -> None:
        pod = self.pods.get(req.pod.uid)
        if pod is None:
            raise EnrollError(
                ErrorCode.ENROLL_FAILED, f"pod {req.pod.namespace}/{req.pod.name} is not enrolled"
            )
        problems = await self._problems(pod)
        if problems:
            raise EnrollError(
                ErrorCode.ENROLL_FAILED, f"pod {pod.record.key}: " + "; ".join(problems)
            )

    async def status(self) -> None:
        return None

    async def gc(self, valid: list[dict[str, Any]]) -> None:
        keep = {str(a.get("containerID")) for a in valid if isinstance(a, dict)}
        for pod in list(self.pods.values()):
            if pod.record.container_id not in keep:
                async with self._lock(pod.record.uid):
                    await self._teardown(pod, reason="CNI GC")

    # -- restart ------------------------------------------------------------------------------

    async def adopt_all(self, *, register: bool = True) -> None:
        """Re-adopt every recorded pod whose netns still exists; forget the others.

        A pod that cannot be re-adopted is left un-meshed and forgotten (its old rules and
        registration are removed with the rest). A store that does not answer is no reason to
        stop serving a pod: its registration is left to `maintain_status`. `register=False`
        serves them without putting their workloads (the store may not answer yet): the caller
        registers them with `reregister_all` once it holds a lease."""
        for record in list(self.state.pods.values()):
            try:
                netns = self.plumbing.open_netns(record.netns)
            except InpodError:
                log.info("adopt.gone", pod=record.key, netns=record.netns)
                await self._forget(record)
                continue
            if netns.identity != record.netns_id:
                netns.close()
                log.info("adopt.replaced", pod=record.key, netns=record.netns)
                await self._forget(record)
                continue
            try:
                await self._enroll(record, netns, adopting=True, register=register)
                log.info("adopt.complete", pod=record.key, registered=register)
            except EnrollError as exc:
                log.error("adopt.failed", pod=record.key, error=exc.msg, forgotten=True)
                await self._forget(record)

    async def reregister_all(self) -> None:
        """Put every workload (again) under the current lease: after adoption, or a lost lease."""
        for pod in list(self.pods.values()):
            status = self._health(pod.identity)
            await self._register(pod.record, status)
            pod.registered = status

    async def maintain_status(self) -> None:
        """Keep every enrolled pod's Workload status what the identity manager can serve now
        (Healthy once it holds a valid certificate, Unhealthy when that expired unrenewed), and
        register pods whose registration was deferred. Runs until cancelled."""
        while True:
            retry = False
            for pod in list(self.pods.values()):
                want = self._health(pod.identity)
                if want == pod.registered:
                    continue
                async with self._lock(pod.record.uid):
                    if self.pods.get(pod.record.uid) is not pod:
                        continue  # torn down meanwhile
                    try:
                        await self._register(pod.record, want)
                    except StoreError as exc:
                        log.warning("workload.status_failed", pod=pod.record.key, error=str(exc))
                        retry = True
                        continue
                    log.info("workload.status", pod=pod.record.key, status=want)
                    pod.registered = want
            with trio.move_on_after(STATUS_RETRY if retry else STATUS_POLL):
                if self.identities is None:
                    await trio.sleep_forever()
                await self.identities.wait_changed()

    def policy_changed(self) -> None:
        """A new snapshot: every pod proxy re-checks its open inbound connections against it
        (only sets an event per pod: safe to call from a snapshot swap listener)."""
        for pod in self.pods.values():
            pod.proxy.policy_changed()

    # -- inspection ---------------------------------------------------------------------------

    def dump(self) -> list[dict[str, Any]]:
        return [
            {
                **p.dump(),
                "destination_l7": destination_l7_of(p.record.annotations, self.destination_l7),
            }
            for p in sorted(self.pods.values(), key=lambda p: p.record.key)
        ]

    async def _problems(self, pod: EnrolledPod) -> list[str]:
        if not pod.netns.path_matches():
            return [f"netns {pod.record.netns} is gone or was replaced"]
        spec = RedirectionSpec.from_annotations(pod.record.annotations)
        problems = await self.plumbing.check_redirection(pod.netns, spec)
        if pod.scope.cancel_called:
            problems.append("listeners are not being served")
        return problems

    # -- the steps ----------------------------------------------------------------------------

    async def _enroll(
        self, record: PodRecord, netns: Netns, *, adopting: bool = False, register: bool = True
    ) -> None:
        """Every step, all or nothing. Each undo is pushed *before* its step runs: a step
        that fails or is cancelled half-way (a put that reached the store, rules applied in a
        worker thread while the caller was cancelled) is undone too. Undoing a step that did
        not happen is a no-op."""
        undo: list[Undo] = []

        async def close_netns() -> None:
            netns.close()

        undo.append(close_netns)
        # Rules and a Workload may be there before their steps run (a re-adopted pod has the
        # previous run's): a failure anywhere removes them.
        undo.append(lambda: self.plumbing.remove_redirection(netns))
        undo.append(lambda: self._unregister(record))
        try:
            try:
                spec = RedirectionSpec.from_annotations(record.annotations)
                destination_l7_annotation(record.annotations)
            except ValueError as exc:
                raise EnrollError(ErrorCode.INVALID_CONFIG, f"pod {record.key}: {exc}") from None
            try:
                listeners = self.plumbing.bind_listeners(netns)
            except InpodError as exc:
                raise EnrollError(ErrorCode.ENROLL_FAILED, f"pod {record.key}: {exc}") from None

            async def close_listeners() -> None:
                listeners.close()

            undo.append(close_listeners)
            workload = self.workload_of(record)
            proxy: PodServer
            if self.pod_server is not None:
                proxy = self.pod_server(record, netns, listeners, workload)
            else:
                proxy = PodProxy(
                    record.key,
                    netns,
                    listeners,
                    workload=workload,
                    identities=self.identities,
                    snapshot=self.snapshot,
                    registry=self.registry,
                    sessions=self.sessions,
                    outbound_policy=self.outbound_policy,
                    destination_l7=self.destination_l7,
                    telemetry=self.telemetry,
                    http_limits=self.http_limits,
                    authenticator=self.authenticator,
                )
            dns = None
            if self.dns and spec.dns_capture:
                try:
                    dns = self.plumbing.dns_proxy(
                        netns,
                        namespace=record.namespace,
                        snapshot=self.snapshot,
                        upstreams=self.dns_upstreams,
                        pod=record.key,
                    )
                except ValueError as exc:  # unusable upstream servers
                    raise EnrollError(
                        ErrorCode.ENROLL_FAILED, f"pod {record.key}: DNS proxy: {exc}"
                    ) from None
            pod = EnrolledPod(record, netns, proxy, dns, identity=workload.identity)
            undo.append(lambda: self._stop_pod(pod))
            try:
                await self._nursery.start(self._serve_pod, pod)
            except BaseExceptionGroup as group:  # the pod's nursery wraps a failed bind
                # (or a worker process's refusal, with --workers N)
                bind_errors, others = group.split((DnsError, WorkerError))
                if bind_errors is None or others is not None:
                    raise
                first: BaseException = bind_errors
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise EnrollError(ErrorCode.ENROLL_FAILED, f"pod {record.key}: {first}") from None
            try:
                await self.plumbing.apply_redirection(netns, spec)
            except InpodError as exc:
                raise EnrollError(ErrorCode.ENROLL_FAILED, f"pod {record.key}: {exc}") from None
            # Registered before the identity is ensured: the CA signs only for service accounts
            # with a Workload on the requesting node, so the first request then succeeds.
            status = self._health(workload.identity)
            try:
                if register:
                    await self._register(record, status)
                    pod.registered = status
            except StoreError as exc:
                if not adopting:
                    raise EnrollError(
                        ErrorCode.TRY_AGAIN_LATER, f"pod {record.key}: register workload: {exc}"
                    ) from None
                log.warning("adopt.register_deferred", pod=record.key, error=str(exc))
            if self.identities is not None:
                undo.append(lambda: self._release_identity(workload.identity, record.uid))
                # Start fetching the certificate now; the proxy waits (bounded) for it.
                self.identities.ensure(workload.identity)
            undo.append(lambda: self._unrecord(record))
            self.state.pods[record.uid] = record
            try:
                self.state.save()
            except OSError as exc:
                raise EnrollError(
                    ErrorCode.ENROLL_FAILED, f"pod {record.key}: persist {self.state.path}: {exc}"
                ) from None
            self.pods[record.uid] = pod
            log.info(
                "enroll.complete",
                pod=record.key,
                ip=record.addresses[0],
                netns=record.netns,
                status=pod.registered,
            )
        except BaseException as exc:
            log.warning("enroll.failed", pod=record.key, error=str(exc) or type(exc).__name__)
            with trio.CancelScope(shield=True):
                await self._undo(record, reversed(undo))
            raise

    async def _undo(self, record: PodRecord, steps: Iterable[Undo]) -> None:
        """Run every step, whatever the others do; each failure is logged."""
        for step in steps:
            try:
                await step()
            except Exception as exc:
                log.warning("enroll.undo_failed", pod=record.key, error=str(exc))

    def workload_of(self, record: PodRecord) -> Workload:
        """The pod as the snapshot will show it once registered (the proxy prefers that copy)."""
        sa = record.service_account or "default"
        td = self.snapshot().trust_domain
        return Workload(
            uid=record.uid,
            name=record.name,
            namespace=record.namespace,
            node=self.node,
            addresses=tuple(record.addresses),
            labels=dict(record.labels),
            annotations=dict(record.annotations),
            service_account=sa,
            identity=f"spiffe://{td}/ns/{record.namespace}/sa/{sa}",
        )

    def _health(self, identity: str) -> WorkloadStatus:
        if self.identities is None or self.identities.can_serve(identity):
            return HEALTHY
        return UNHEALTHY

    async def _release_identity(self, identity: str, leaving_uid: str) -> None:
        """Release `identity` unless another enrolled pod of this node still has it."""
        if self.identities is None:
            return
        for pod in self.pods.values():
            if pod.record.uid != leaving_uid and pod.identity == identity:
                return
        self.identities.release(identity)
        log.info("identity.released", identity=identity)

    async def _serve_pod(self, pod: EnrolledPod, *, task_status: trio.TaskStatus[None]) -> None:
        pod.serving = True
        try:
            with pod.scope:
                async with trio.open_nursery() as nursery:
                    # DNS first: a failed bind then leaves the capture listeners to the undo.
                    if pod.dns is not None:
                        await nursery.start(pod.dns.run)
                    await nursery.start(pod.proxy.run)
                    task_status.started()
        finally:
            pod.stopped.set()

    async def _stop_pod(self, pod: EnrolledPod) -> None:
        """Stop serving the pod and wait (bounded) until its sockets are closed."""
        pod.scope.cancel()
        pod.state = "stopped"
        if pod.serving:
            with trio.move_on_after(STOP_TIMEOUT):
                await pod.stopped.wait()
        pod.proxy.close_listeners()

    async def _register(self, record: PodRecord, status: WorkloadStatus) -> None:
        doc = workload_document(self.node, record, status)
        await self.store.put(
            keys.workload(self.node, record.uid), codec.encode(doc), lease=self._lease()
        )

    async def _unregister(self, record: PodRecord) -> None:
        try:
            await self.store.delete(keys.workload(self.node, record.uid))
        except StoreError as exc:  # the lease reaps it if this agent dies
            log.warning("unregister.failed", pod=record.key, error=str(exc))

    async def _unrecord(self, record: PodRecord) -> None:
        self.pods.pop(record.uid, None)
        if self.state.pods.pop(record.uid, None) is not None:
            self.state.save()

    async def _teardown(self, pod: EnrolledPod, *, reason: str) -> None:
        """Undo every step of `_enroll`, in reverse; shielded, so a cancelled DEL still leaves
        nothing behind, and a failing step does not stop the others."""
        record, netns = pod.record, pod.netns

        async def remove_rules() -> None:
            try:
                await self.plumbing.remove_redirection(netns)
            except InpodError as exc:  # the netns may already be gone; its rules went with it
                log.info("teardown.netns_gone", pod=record.key, error=str(exc))

        async def close_netns() -> None:
            netns.close()

        with trio.CancelScope(shield=True):
            self.pods.pop(record.uid, None)
            await self._undo(
                record,
                (
                    lambda: self._release_identity(pod.identity, record.uid),
                    lambda: self._unregister(record),
                    remove_rules,
                    lambda: self._stop_pod(pod),
                    close_netns,
                    lambda: self._unrecord(record),
                ),
            )
        log.info("unenroll.complete", pod=record.key, reason=reason)

    async def _forget(self, record: PodRecord) -> None:
        await self._unregister(record)
        await self._unrecord(record)

    def _lock(self, uid: str) -> trio.Lock:
        return self._locks.setdefault(uid, trio.Lock())
