"""Enrollment: the agent's side of each CNI call, and re-adoption after a restart.

For every pod: bind the agent's listeners inside the pod's netns and start serving them, then
install the redirection rules, then register the pod as a Workload under the agent's lease, then
persist the record. Any failure undoes what was done, in reverse, so a pod is either fully meshed
or untouched. DEL undoes it all and never fails for a pod that is already gone.

Each pod's proxy gets what the data plane needs: the pod as a Workload (its SPIFFE identity),
the identity provider (`ensure` on enroll, `release` when the last pod of an identity leaves),
the snapshot, and the node-wide endpoint picker and TLS session cache.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from nodeagent.agent.state import AgentState, PodRecord
from nodeagent.cni.errors import ErrorCode
from nodeagent.cni.metadata import PodMetadataSource
from nodeagent.cni.protocol import CniRequest, EnrollError
from nodeagent.dns import DnsError, DnsProxy
from nodeagent.http import Limits
from nodeagent.identity.api import IdentityProvider
from nodeagent.inpod import (
    InpodError,
    Netns,
    RedirectionSpec,
    aapply_redirection,
    acheck_redirection,
    aremove_redirection,
    bind_listeners,
)
from nodeagent.log import get_logger
from nodeagent.proxy.outbound import BalancedPicker, EndpointPicker, OutboundPolicy
from nodeagent.proxy.pod import PodProxy
from nodeagent.snapshot import Snapshot, Workload
from nodeagent.store import codec, keys
from nodeagent.store.base import Store, StoreError
from nodeagent.telemetry.dataplane import Sinks
from nodeagent.tunnel import SessionCache

log = get_logger("agent.enroll")

OPT_OUT_LABEL = "istio.io/dataplane-mode"
WORKLOAD_API = "mesh.nodeagent.io/v1alpha1"


@dataclass(slots=True)
class EnrolledPod:
    record: PodRecord
    netns: Netns
    proxy: PodProxy
    dns: DnsProxy | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: str = "enrolled"

    def listeners(self) -> list[dict[str, Any]]:
        """What the agent serves inside this pod's netns, as bound."""
        rows = []
        for role, listener in (
            ("outbound", self.proxy.listeners.outbound),
            ("inbound-plaintext", self.proxy.listeners.inbound),
            ("tunnel", self.proxy.listeners.tunnel),
        ):
            try:
                host, port = listener.socket.getsockname()[:2]
            except OSError:  # closed while the pod is being removed
                continue
            rows.append({"role": role, "protocol": "tcp", "address": f"{host}:{port}"})
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
            "listeners": self.listeners(),
            "connections": self.proxy.statistics(),
        }


def workload_document(node: str, record: PodRecord) -> dict[str, Any]:
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
        identities: IdentityProvider | None = None,
        snapshot: Callable[[], Snapshot] | None = None,
        outbound_policy: OutboundPolicy = "ALLOW_ANY",
        picker: EndpointPicker | None = None,
        dns: bool = True,
        dns_upstreams: Sequence[str] | None = None,
        telemetry: Sinks | None = None,
        http_limits: Limits | None = None,
    ) -> None:
        self.node = node
        self.http_limits = http_limits  # every pod's L7 proxy (agent flags)
        self.telemetry = telemetry  # metrics, access log and tracer for every pod's proxy
        # The in-pod DNS proxy (15053) for pods whose spec captures DNS; upstreams default to
        # the node's resolv.conf.
        self.dns = dns
        self.dns_upstreams = dns_upstreams
        self.identities = identities
        self.snapshot: Callable[[], Snapshot] = snapshot if snapshot is not None else Snapshot.empty
        self.outbound_policy: OutboundPolicy = outbound_policy
        self.picker = picker if picker is not None else BalancedPicker()
        self.sessions = SessionCache()  # shared by every pod: keyed by source identity
        self.store = store
        self.state = state
        self.metadata = metadata
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
            try:
                netns = Netns.open(req.netns)
            except InpodError as exc:
                raise EnrollError(ErrorCode.CONTAINER_UNKNOWN, str(exc)) from None
            record = PodRecord(
                uid=req.pod.uid,
                namespace=req.pod.namespace,
                name=req.pod.name,
                container_id=req.container_id,
                netns=req.netns,
                netns_id=netns.identity,
                addresses=pod_addresses(req.prev_result),
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

    async def adopt_all(self) -> None:
        """Re-adopt every recorded pod whose netns still exists; forget the others."""
        for record in list(self.state.pods.values()):
            try:
                netns = Netns.open(record.netns)
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
                await self._enroll(record, netns)
                log.info("adopt.complete", pod=record.key)
            except EnrollError as exc:
                log.error("adopt.failed", pod=record.key, error=exc.msg)

    async def reregister_all(self) -> None:
        """After the lease was lost: put every workload again under the new lease."""
        for pod in self.pods.values():
            await self._register(pod.record)

    def policy_changed(self) -> None:
        """A new snapshot: every pod proxy re-checks its open inbound connections against it
        (only sets an event per pod: safe to call from a snapshot swap listener)."""
        for pod in self.pods.values():
            pod.proxy.policy_changed()

    # -- inspection ---------------------------------------------------------------------------

    def dump(self) -> list[dict[str, Any]]:
        return [p.dump() for p in sorted(self.pods.values(), key=lambda p: p.record.key)]

    async def _problems(self, pod: EnrolledPod) -> list[str]:
        if not pod.netns.path_matches():
            return [f"netns {pod.record.netns} is gone or was replaced"]
        spec = RedirectionSpec.from_annotations(pod.record.annotations)
        problems = await acheck_redirection(pod.netns, spec)
        if pod.scope.cancel_called:
            problems.append("listeners are not being served")
        return problems

    # -- the steps ----------------------------------------------------------------------------

    async def _enroll(self, record: PodRecord, netns: Netns) -> None:
        undo: list[Callable[[], Awaitable[None]]] = []
        try:
            try:
                spec = RedirectionSpec.from_annotations(record.annotations)
            except ValueError as exc:
                raise EnrollError(ErrorCode.INVALID_CONFIG, f"pod {record.key}: {exc}") from None
            try:
                listeners = bind_listeners(netns)
            except InpodError as exc:
                raise EnrollError(ErrorCode.ENROLL_FAILED, f"pod {record.key}: {exc}") from None
            workload = self.workload_of(record)
            proxy = PodProxy(
                record.key,
                netns,
                listeners,
                workload=workload,
                identities=self.identities,
                snapshot=self.snapshot,
                picker=self.picker,
                sessions=self.sessions,
                outbound_policy=self.outbound_policy,
                telemetry=self.telemetry,
                http_limits=self.http_limits,
            )
            dns = (
                DnsProxy(
                    netns,
                    namespace=record.namespace,
                    snapshot=self.snapshot,
                    upstreams=self.dns_upstreams,
                    pod=record.key,
                )
                if self.dns and spec.dns_capture
                else None
            )
            pod = EnrolledPod(record, netns, proxy, dns)
            try:
                await self._nursery.start(self._serve_pod, pod)
            except BaseExceptionGroup as group:  # the pod's nursery wraps a failed bind
                bind_errors, others = group.split(DnsError)
                if bind_errors is None or others is not None:
                    raise
                first: BaseException = bind_errors
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise EnrollError(ErrorCode.ENROLL_FAILED, f"pod {record.key}: {first}") from None
            undo.append(lambda: self._stop_pod(pod))
            if self.identities is not None:
                # Start fetching the certificate now; the proxy waits (bounded) for it.
                self.identities.ensure(workload.identity)
                undo.append(lambda: self._release_identity(workload.identity, record.uid))
            try:
                await aapply_redirection(netns, spec)
            except InpodError as exc:
                raise EnrollError(ErrorCode.ENROLL_FAILED, f"pod {record.key}: {exc}") from None
            undo.append(lambda: aremove_redirection(netns))
            try:
                await self._register(record)
            except StoreError as exc:
                raise EnrollError(
                    ErrorCode.TRY_AGAIN_LATER, f"pod {record.key}: register workload: {exc}"
                ) from None
            self.pods[record.uid] = pod
            self.state.pods[record.uid] = record
            self.state.save()
            log.info("enroll.complete", pod=record.key, ip=record.addresses[0], netns=record.netns)
        except BaseException:
            with trio.CancelScope(shield=True):
                for step in reversed(undo):
                    try:
                        await step()
                    except Exception as exc:  # keep undoing; report the first failure
                        log.warning("enroll.undo_failed", pod=record.key, error=str(exc))
                netns.close()
            raise

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

    async def _release_identity(self, identity: str, leaving_uid: str) -> None:
        """Release `identity` unless another enrolled pod of this node still has it."""
        if self.identities is None:
            return
        for pod in self.pods.values():
            other = pod.proxy.workload
            if pod.record.uid != leaving_uid and other is not None and other.identity == identity:
                return
        self.identities.release(identity)
        log.info("identity.released", identity=identity)

    async def _serve_pod(self, pod: EnrolledPod, *, task_status: trio.TaskStatus[None]) -> None:
        with pod.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(pod.proxy.run)
                if pod.dns is not None:
                    await nursery.start(pod.dns.run)
                task_status.started()

    async def _stop_pod(self, pod: EnrolledPod) -> None:
        pod.scope.cancel()
        pod.state = "stopped"

    async def _register(self, record: PodRecord) -> None:
        doc = workload_document(self.node, record)
        await self.store.put(
            keys.workload(self.node, record.uid), codec.encode(doc), lease=self._lease()
        )

    async def _teardown(self, pod: EnrolledPod, *, reason: str) -> None:
        await self._stop_pod(pod)
        try:
            await aremove_redirection(pod.netns)
        except InpodError as exc:  # the netns may already be gone; its rules went with it
            log.info("teardown.netns_gone", pod=pod.record.key, error=str(exc))
        pod.netns.close()
        self.pods.pop(pod.record.uid, None)
        if pod.proxy.workload is not None:
            await self._release_identity(pod.proxy.workload.identity, pod.record.uid)
        await self._forget(pod.record)
        log.info("unenroll.complete", pod=pod.record.key, reason=reason)

    async def _forget(self, record: PodRecord) -> None:
        try:
            await self.store.delete(keys.workload(self.node, record.uid))
        except StoreError as exc:  # the lease will reap it
            log.warning("unregister.failed", pod=record.key, error=str(exc))
        self.state.pods.pop(record.uid, None)
        self.state.save()

    def _lock(self, uid: str) -> trio.Lock:
        return self._locks.setdefault(uid, trio.Lock())
