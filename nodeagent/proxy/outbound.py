"""The outbound routing decision (pure): where does a captured connection to dst go?

`outbound_decision(snap, dst_ip, dst_port, registry=…, policy=…)` reads the snapshot and returns
one of `ToWorkload` (through the mTLS tunnel to a meshed workload: always, never plaintext),
`Passthrough` (straight to an address outside the mesh) or `Refuse`. A service port with
VirtualService `tcp` routes is first routed by `nodeagent.routing.route_tcp` (weights, subsets).
`http_target` says whether a destination is an HTTP or HTTP/2 service port (then an L7 proxy
takes the connection instead). Endpoints are picked by the node's one `balance.Registry` (the
DestinationRule's policy, outlier ejection): the decision carries the picked endpoint's live handle
(`ToWorkload.handle`) for the L4 path to bracket the connection with; the L7 proxy picks through
the same registry. Moving bytes is elsewhere (`outbound_path.py`, `inbound_path.py`); this file
sends nothing, imports nothing that does, and is tested against hand-made snapshots.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from nodeagent.balance import NoHealthyUpstream, PickContext, Registry
from nodeagent.balance.state import EndpointState
from nodeagent.proxy import self_call
from nodeagent.routing import Source, TcpRequest, route_tcp
from nodeagent.snapshot import L7Protocol, ServicePort, ServiceTarget, Snapshot, Workload

OutboundPolicy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]


@dataclass(frozen=True, slots=True)
class ToWorkload:
    """Tunnel to `workload` (its pod IP, port 15008) for its port `port`."""

    workload: Workload
    address: str
    port: int
    service: str | None = None  # namespace/name when reached through a service
    route: str | None = None  # the VirtualService tcp route that chose it (ns/vs.<rule>)
    # The balancer's live state of the picked endpoint (None when a pod IP was addressed): the L4
    # path calls start() when it connects and finish() when the connection ends or fails.
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
    # "UH": every endpoint is ejected (panic disabled); "self_call": the target is one of the
    # agent's own listeners (`self_call.py`)
    flag: str = "outbound_refused"


OutboundDecision = ToWorkload | Passthrough | Refuse


# The L7 proxies: HTTP/1.1 (`nodeagent.http`) and HTTP/2 + gRPC (`nodeagent.http2`).
HTTP_PROTOCOLS = frozenset({L7Protocol.HTTP1, L7Protocol.HTTP2})
L7_PROTOCOLS = HTTP_PROTOCOLS | {L7Protocol.SNIFF}


def is_http(port: ServicePort) -> bool:
    """Istio's protocol rule for a Service port that an L7 proxy takes: HTTP (`http`, `http-*`,
    `appProtocol: http`: `L7Protocol.HTTP1`) or HTTP/2 (`http2`, `grpc`, `h2c`…: `HTTP2`). One
    rule for both ends: the source agent routes such a port, the destination agent
    authenticates and authorizes its requests (`inbound_http_port`; HTTP/1.1 in
    `nodeagent.http.inbound`, HTTP/2 and gRPC streams in `nodeagent.http2.inbound`)."""
    return port.l7_protocol in HTTP_PROTOCOLS


def inbound_http_port(snap: Snapshot, workload: Workload, port: int) -> ServicePort | None:
    """The HTTP or HTTP/2 service port (`is_http`) of a Service selecting `workload` in its
    namespace whose target is the workload's `port`: the destination agent parses such a
    connection (by the port's `l7_protocol`). A port no such service port targets (TCP, or an
    undeclared protocol) stays L4."""
    for svc in snap.services():
        if svc.kind != "Service" or svc.namespace != workload.namespace or not svc.selector:
            continue
        if not all(workload.labels.get(k) == v for k, v in svc.selector.items()):
            continue
        for p in svc.ports:
            target = p.target_port
            if isinstance(target, str):
                target = workload.ports.get(target, p.port)
            if target == port and is_http(p):
                return p
    return None


def http_target(snap: Snapshot, dst_ip: str, dst_port: int) -> ServiceTarget | None:
    """The service port `dst_ip:dst_port` addresses when an L7 proxy should take it: a service
    VIP whose port is HTTP or HTTP/2 (gRPC) by Istio's protocol rules (`ServicePort.l7_protocol`:
    the one place that says so), with endpoints reachable by IP (a ServiceEntry with resolution
    NONE or DNS stays L4: the app already chose the address)."""
    found = l7_target(snap, dst_ip, dst_port)
    if found is None or not is_http(found.port):
        return None
    return found


def l7_target(snap: Snapshot, dst_ip: str, dst_port: int) -> ServiceTarget | None:
    """`http_target`, or a service port whose protocol is not declared (`L7Protocol.SNIFF`):
    the client's first bytes decide between the L7 proxies and L4 (`http2/sniff.py`)."""
    found = snap.find_address(dst_ip, dst_port)
    if not isinstance(found, ServiceTarget):
        return None
    if found.port.l7_protocol not in L7_PROTOCOLS:
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


def outbound_decision(
    snap: Snapshot,
    dst_ip: str,
    dst_port: int,
    *,
    registry: Registry,
    policy: OutboundPolicy = "ALLOW_ANY",
    source: Source | None = None,
    rand: Callable[[], float] = random.random,
    source_ip: str | None = None,
) -> OutboundDecision:
    """`registry` picks the endpoint; `source` (the calling pod's namespace and labels) is what
    VirtualService tcp routes match on; `rand` draws the weighted choice; `source_ip` (the
    calling pod's address) is what consistentHash useSourceIp hashes. A target that is one of
    the agent's own listeners is refused (flag `self_call`): the agent would connect to itself."""
    decision = _decision(
        snap,
        dst_ip,
        dst_port,
        registry=registry,
        policy=policy,
        source=source,
        rand=rand,
        source_ip=source_ip,
    )
    if isinstance(decision, ToWorkload | Passthrough):
        loop = self_call.listener_target(snap, decision.address, decision.port, source_ip=source_ip)
        if loop is not None:
            return Refuse(loop, flag=self_call.FLAG)
    return decision


def _decision(
    snap: Snapshot,
    dst_ip: str,
    dst_port: int,
    *,
    registry: Registry,
    policy: OutboundPolicy = "ALLOW_ANY",
    source: Source | None = None,
    rand: Callable[[], float] = random.random,
    source_ip: str | None = None,
) -> OutboundDecision:
    """The decision before the self-call check."""
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
            decision = _service(snap, target, dst_ip, dst_port, registry, source, source_ip)
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
        return _service(snap, found, dst_ip, dst_port, registry, source, source_ip)
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
    decision = route_tcp(
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
    registry: Registry,
    source: Source | None = None,
    source_ip: str | None = None,
) -> OutboundDecision:
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
    subset_name = target.subset_name if isinstance(target, _SubsetTarget) else None
    ns = source.namespace if source is not None and source.namespace else None
    picker = registry.picker_for(snap, service, subset_name, target.port.port, from_namespace=ns)
    try:
        handle = picker.pick(PickContext(source_ip=source_ip))
    except NoHealthyUpstream as exc:
        return Refuse(str(exc), flag="UH")
    endpoint = handle.endpoint
    workload = endpoint.workload
    if workload is not None and workload.identity:
        return ToWorkload(workload, endpoint.address, endpoint.port, service.ref, handle=handle)
    if not _is_ip(endpoint.address):
        # A DNS-resolved ServiceEntry endpoint: the client already resolved the name.
        return Passthrough(dst_ip, dst_port, "ServiceEntry DNS endpoint", service.ref)
    return Passthrough(
        endpoint.address, endpoint.port, "endpoint outside the mesh", service.ref, handle
    )
