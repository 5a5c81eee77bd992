"""The outbound routing decision (pure): where does a captured connection to dst go?

`decide(snap, dst_ip, dst_port, picker=…, policy=…)` reads the snapshot and returns one of
`ToWorkload` (through the mTLS tunnel to a meshed workload: always, never plaintext),
`Passthrough` (straight to an address outside the mesh) or `Refuse`. Moving bytes is elsewhere
(`forward.py`); this file sends nothing and is tested against hand-made snapshots.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass
from typing import Literal, Protocol

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

    @property
    def identity(self) -> str:
        return self.workload.identity


@dataclass(frozen=True, slots=True)
class Passthrough:
    address: str
    port: int
    reason: str
    service: str | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str


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
) -> Decision:
    found = snap.find_address(dst_ip, dst_port)
    if isinstance(found, Workload):
        # A pod IP (headless services and services without a VIP end up here too).
        if found.identity:
            return ToWorkload(found, dst_ip, dst_port)
        return Passthrough(dst_ip, dst_port, "workload without identity")
    if isinstance(found, ServiceTarget):
        return _service(snap, found, dst_ip, dst_port, picker)
    if policy == "REGISTRY_ONLY":
        return Refuse(f"{dst_ip}:{dst_port} is not in the mesh registry (REGISTRY_ONLY)")
    return Passthrough(dst_ip, dst_port, "unknown destination")


def _service(
    snap: Snapshot, target: ServiceTarget, dst_ip: str, dst_port: int, picker: EndpointPicker
) -> Decision:
    service = target.service
    if service.kind == "ServiceEntry" and service.resolution == "NONE":
        return Passthrough(dst_ip, dst_port, "ServiceEntry resolution NONE", service.ref)
    endpoints = snap.endpoints(service, target.port)
    if not endpoints:
        if service.kind == "ServiceEntry":
            # A ServiceEntry without endpoints names an external host reached by its address.
            return Passthrough(dst_ip, dst_port, "ServiceEntry without endpoints", service.ref)
        return Refuse(f"service {service.ref} port {dst_port} has no endpoints")
    endpoint = picker.pick(target, endpoints)
    workload = endpoint.workload
    if workload is not None and workload.identity:
        return ToWorkload(workload, endpoint.address, endpoint.port, service.ref)
    if not _is_ip(endpoint.address):
        # A DNS-resolved ServiceEntry endpoint: the client already resolved the name.
        return Passthrough(dst_ip, dst_port, "ServiceEntry DNS endpoint", service.ref)
    return Passthrough(endpoint.address, endpoint.port, "endpoint outside the mesh", service.ref)
