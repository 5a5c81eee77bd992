"""The outbound routing decision (pure): where does a captured connection to dst go?

`decide(snap, dst_ip, dst_port, picker=…, policy=…)` reads the snapshot and returns one of
`ToWorkload` (through the mTLS tunnel to a meshed workload: always, never plaintext),
`Passthrough` (straight to an address outside the mesh) or `Refuse`. A service port with
VirtualService `tcp` routes is first routed by `nodeagent.routing.decide_tcp` (weights, subsets).
`http_target` says whether a destination is an HTTP/1.1 service port (then the L7 proxy takes the
connection instead).
`BalancedPicker` is the node's picker on top of one `balance.Registry`: `decide` then returns
the picked endpoint's live handle (`ToWorkload.handle`) for the L4 proxy to bracket the
connection with, and the L7 proxy uses the registry itself (feedback, circuit breakers).
Moving bytes is elsewhere (`outbound_path.py`, `inbound_path.py`); this file sends nothing and
is tested against hand-made snapshots.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from nodeagent.balance import NoHealthyUpstream, PickContext, Registry
from nodeagent.balance.state import EndpointState
from nodeagent.routing import Source, TcpRequest, decide_tcp
from nodeagent.snapshot import Endpoint, ServiceTarget, Snapshot, Workload

OutboundPolicy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]
TUNNEL_PORT = 15008


@dataclass(frozen=True, slots=True)
class ToWorkload:
    """Tunnel to `workload` (its pod IP, port 15008) for its port `port`."""

    workload: Workload
    address: str
    port: int
    service: str | None = None  # namespace/name when reached through a service
    route: str | None = None  # the VirtualService tcp route that chose it (ns/vs.<rule>)
    # The balancer's live state of the picked endpoint (BalancedPicker only): the L4 proxy calls
    # start() when it connects and finish() when the connection ends or fails.
    handle: EndpointState | None = field(default=None, compare=False, repr=False)

    @property
    def identity(self) -> str:
        return self.workload.identity


@dataclass(frozen=True, slots=True)
class Passthrough:
    address: str
    port: int
    reason: str
    service: str | None = None
    handle: EndpointState | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str
    flag: str = "outbound_refused"  # "UH": every endpoint is ejected (panic disabled)


Decision = ToWorkload | Passthrough | Refuse


class EndpointPicker(Protocol):
    """Chooses one endpoint of a service port; the load-balancing work replaces this."""

    def pick(self, target: ServiceTarget, endpoints: tuple[Endpoint, ...]) -> Endpoint: ...


class RoundRobinPicker:
    """Round robin per service port, in the snapshot's endpoint order."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, int], itertools.count[int]] = {}

    def pick(self, target: ServiceTarget, endpoints: tuple[Endpoint, ...]) -> Endpoint:
        key = (target.service.kind, target.service.ref, target.port.port)
        counter = self._counters.setdefault(key, itertools.count())
        return endpoints[next(counter) % len(endpoints)]


class BalancedPicker:
    """The node's endpoint picker over one `balance.Registry` (clusters keyed by service,
    subset and port, with the DestinationRule's policy: top-level, subset, port-level).

    `decide` calls `pick_handle` (the snapshot is at hand there); `pick` serves the plain
    `EndpointPicker` interface (no feedback: callers that cannot report outcomes).
    """

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        self._last: Snapshot | None = None

    def pick_handle(
        self,
        snap: Snapshot,
        target: ServiceTarget,
        *,
        subset: str | None = None,
        ctx: PickContext | None = None,
        from_namespace: str | None = None,
    ) -> EndpointState:
        """Raises NoHealthyUpstream when the cluster has nothing to pick."""
        self._last = snap
        picker = self.registry.picker_for(
            snap, target.service, subset, target.port.port, from_namespace=from_namespace
        )
        return picker.pick(ctx) if ctx is not None else picker.pick()

    def pick(self, target: ServiceTarget, endpoints: tuple[Endpoint, ...]) -> Endpoint:
        snap = self._last
        if snap is not None:
            try:
                state = self.pick_handle(snap, target)
            except NoHealthyUpstream:
                pass
            else:
                if state.endpoint in endpoints:
                    return state.endpoint
        return endpoints[0]


HTTP_PROTOCOLS = frozenset({"http"})  # HTTP/1.1 only: h11 does not speak http2/grpc


def http_target(snap: Snapshot, dst_ip: str, dst_port: int) -> ServiceTarget | None:
    """The service port `dst_ip:dst_port` addresses when the L7 (HTTP/1.1) proxy should take it:
    a service VIP whose port is HTTP by Istio's protocol rules, with endpoints reachable by IP
    (a ServiceEntry with resolution NONE or DNS stays L4: the app already chose the address)."""
    found = snap.find_address(dst_ip, dst_port)
    if not isinstance(found, ServiceTarget):
        return None
    if found.port.protocol_hint not in HTTP_PROTOCOLS:
        return None
    if found.service.kind == "ServiceEntry" and found.service.resolution != "STATIC":
        return None
    return found


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def decide(
    snap: Snapshot,
    dst_ip: str,
    dst_port: int,
    *,
    picker: EndpointPicker,
    policy: OutboundPolicy = "ALLOW_ANY",
    source: Source | None = None,
    rand: Callable[[], float] = random.random,
    source_ip: str | None = None,
) -> Decision:
    """`source` (the calling pod's namespace and labels) is what VirtualService tcp routes match
    on; `rand` draws the weighted choice; `source_ip` is what consistentHash useSourceIp hashes."""
    found = snap.find_address(dst_ip, dst_port)
    if isinstance(found, Workload):
        # A pod IP (headless services and services without a VIP end up here too).
        if found.identity:
            return ToWorkload(found, dst_ip, dst_port)
        return Passthrough(dst_ip, dst_port, "workload without identity")
    if isinstance(found, ServiceTarget):
        routed = _tcp_route(snap, found, dst_ip, dst_port, source or Source(), rand)
        if isinstance(routed, Refuse):
            return routed
        if routed is not None:
            target, route = routed
            decision = _service(snap, target, dst_ip, dst_port, picker, source, source_ip)
            if isinstance(decision, ToWorkload):
                return ToWorkload(
                    decision.workload,
                    decision.address,
                    decision.port,
                    decision.service,
                    route,
                    decision.handle,
                )
            return decision
        return _service(snap, found, dst_ip, dst_port, picker, source, source_ip)
    if policy == "REGISTRY_ONLY":
        return Refuse(f"{dst_ip}:{dst_port} is not in the mesh registry (REGISTRY_ONLY)")
    return Passthrough(dst_ip, dst_port, "unknown destination")


def _tcp_route(
    snap: Snapshot,
    target: ServiceTarget,
    dst_ip: str,
    dst_port: int,
    source: Source,
    rand: Callable[[], float],
) -> tuple[ServiceTarget, str] | Refuse | None:
    """The service port a VirtualService tcp route sends this connection to (with the route's
    name); None when no tcp rule applies (the addressed service itself)."""
    if not snap.routes_for(target.service.hostname, source.gateway):
        return None
    decision = decide_tcp(
        snap, source, TcpRequest(target.service.hostname, dst_port, dst_ip), rand=rand
    )
    chosen = decision.chosen
    if chosen is None or decision.route_name in ("", "default"):
        return None
    if chosen.error is not None or chosen.service is None or chosen.port is None:
        return Refuse(f"tcp route {decision.route_name}: no destination {chosen.name}")
    port = chosen.service.port(chosen.port)
    if port is None:
        return Refuse(f"tcp route {decision.route_name}: {chosen.host} has no port {chosen.port}")
    if chosen.subset_labels:
        target = _SubsetTarget(chosen.service, port, chosen.subset_labels, chosen.subset)
        return target, decision.route_name
    return ServiceTarget(chosen.service, port), decision.route_name


@dataclass(frozen=True, slots=True)
class _SubsetTarget(ServiceTarget):
    """A service port narrowed to a DestinationRule subset's labels."""

    subset: Mapping[str, str] = field(default_factory=dict)
    subset_name: str | None = None


def _service(
    snap: Snapshot,
    target: ServiceTarget,
    dst_ip: str,
    dst_port: int,
    picker: EndpointPicker,
    source: Source | None = None,
    source_ip: str | None = None,
) -> Decision:
    service = target.service
    if service.kind == "ServiceEntry" and service.resolution == "NONE":
        return Passthrough(dst_ip, dst_port, "ServiceEntry resolution NONE", service.ref)
    subset = target.subset if isinstance(target, _SubsetTarget) else None
    endpoints = snap.endpoints(service, target.port, subset=subset)
    if not endpoints:
        if service.kind == "ServiceEntry":
            # A ServiceEntry without endpoints names an external host reached by its address.
            return Passthrough(dst_ip, dst_port, "ServiceEntry without endpoints", service.ref)
        return Refuse(f"service {service.ref} port {dst_port} has no endpoints")
    handle: EndpointState | None = None
    if isinstance(picker, BalancedPicker):
        subset_name = target.subset_name if isinstance(target, _SubsetTarget) else None
        ns = source.namespace if source is not None and source.namespace else None
        try:
            handle = picker.pick_handle(
                snap,
                target,
                subset=subset_name,
                ctx=PickContext(source_ip=source_ip),
                from_namespace=ns,
            )
        except NoHealthyUpstream as exc:
            return Refuse(str(exc), flag="UH")
        endpoint = handle.endpoint
    else:
        endpoint = picker.pick(target, endpoints)
    workload = endpoint.workload
    if workload is not None and workload.identity:
        return ToWorkload(workload, endpoint.address, endpoint.port, service.ref, handle=handle)
    if not _is_ip(endpoint.address):
        # A DNS-resolved ServiceEntry endpoint: the client already resolved the name.
        return Passthrough(dst_ip, dst_port, "ServiceEntry DNS endpoint", service.ref)
    return Passthrough(
        endpoint.address, endpoint.port, "endpoint outside the mesh", service.ref, handle
    )
