"""EndpointSlices: the endpoints of Kubernetes Services without a selector.

kube-sync mirrors every EndpointSlice to `/mesh/v1/kube/endpointslices/<ns>/<name>`
(docs/kubernetes.md). For a Service with no (or an empty) `spec.selector`, Kubernetes has no pods
to select: whoever manages the Service writes its EndpointSlices, labelled
`kubernetes.io/service-name: <service>`, and kube-proxy reads them. The snapshot does the same:

- `convert_slice`: one mirrored document → an `EndpointSlice` (IPv4 only, like the mirror and the
  data path; ConvertError names the field otherwise).
- `SliceIndex`: the builder's slices filed by service and by endpoint address, so one slice event
  dirties only its service, and one workload event only the services with a slice naming its
  address.
- `SliceIndex.endpoints`: a selector-less Service's endpoints, by kube-proxy's rules: a Service
  port takes the slice port of the same name (and protocol), whose number is the endpoint's port
  (the Service's `targetPort` is not used); ready endpoints, else (none ready) those serving and
  terminating; one per address:port across slices, with the best condition it is listed with.
  An address that is a meshed workload is that workload's endpoint (mTLS through the tunnel, its
  identity; none while Unhealthy); any other address is an endpoint outside the mesh (plaintext
  passthrough, like a ServiceEntry's).

Services with a selector ignore their slices: their endpoints are the workloads they select,
never counted twice.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from nodeagent.snapshot import members as membership
from nodeagent.snapshot.errors import ConvertError
from nodeagent.snapshot.members import Members, each
from nodeagent.snapshot.model import (
    EMPTY,
    Endpoint,
    EndpointSlice,
    Service,
    SliceEndpoint,
    SlicePort,
    Workload,
)
from nodeagent.store import keys

# Kubernetes' own bounds on one EndpointSlice (the API server rejects more).
MAX_ENDPOINTS = 1000
MAX_PORTS = 100
ADDRESS_TYPE = "IPv4"

ServiceRef = tuple[str, str]  # (namespace, service name)


def parse_slice_key(key: str) -> tuple[str, str] | None:
    """(namespace, name) of an EndpointSlice key, or None for any other key."""
    if not key.startswith(keys.KUBE_ENDPOINT_SLICES):
        return None
    parts = key[len(keys.KUBE_ENDPOINT_SLICES) :].split("/")
    if len(parts) == 2 and all(parts):
        return sys.intern(parts[0]), parts[1]
    return None


def convert_slice(key: str, doc: Any, namespace: str, name: str) -> EndpointSlice:
    """The mirrored document at `key` (its namespace and name come from the key)."""

    def fail(path: str, reason: str) -> ConvertError:
        return ConvertError(key, path, reason)

    if not isinstance(doc, dict):
        raise fail("", f"document is a {type(doc).__name__}, not a map")
    address_type = doc.get("addressType")
    if address_type != ADDRESS_TYPE:
        raise fail("addressType", f"{address_type!r} is not supported (only {ADDRESS_TYPE})")
    service = doc.get("service") or ""
    if not isinstance(service, str) or "/" in service:
        raise fail("service", f"{service!r} is not a service name")
    ports = []
    for i, p in enumerate(_seq(doc.get("ports"), "ports", MAX_PORTS, fail)):
        if not isinstance(p, dict):
            raise fail(f"ports[{i}]", "must be a map")
        number = p.get("port")
        if number is None:
            continue  # "all ports": kube-proxy has nothing to map it to either
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            raise fail(f"ports[{i}].port", f"{number!r} is not a port number")
        port_name = p.get("name") or ""
        protocol = p.get("protocol") or "TCP"
        if not isinstance(port_name, str) or not isinstance(protocol, str):
            raise fail(f"ports[{i}]", "name and protocol must be strings")
        ports.append(SlicePort(sys.intern(port_name), number, protocol.upper()))
    endpoints = []
    for i, e in enumerate(_seq(doc.get("endpoints"), "endpoints", MAX_ENDPOINTS, fail)):
        path = f"endpoints[{i}]"
        if not isinstance(e, dict):
            raise fail(path, "must be a map")
        addresses = _seq(e.get("addresses"), f"{path}.addresses", MAX_ENDPOINTS, fail)
        if not addresses:
            continue  # the API requires one; nothing to connect to without it
        try:
            address = str(ipaddress.IPv4Address(addresses[0]))
        except (ValueError, TypeError):
            raise fail(f"{path}.addresses[0]", f"{addresses[0]!r} is not an IPv4 address") from None
        conditions = {}
        for condition, default in (("ready", True), ("serving", True), ("terminating", False)):
            value = e.get(condition, default)
            if value is None:
                value = default
            if not isinstance(value, bool):
                raise fail(f"{path}.{condition}", f"{value!r} is not a boolean")
            conditions[condition] = value
        endpoints.append(SliceEndpoint(address, **conditions))
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service=sys.intern(service),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


def _seq(value: Any, path: str, bound: int, fail: Callable[[str, str], ConvertError]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise fail(path, f"must be a list, not {type(value).__name__}")
    if len(value) > bound:
        raise fail(path, f"{len(value)} entries, more than {bound}")
    return value


def uses_endpoint_slices(svc: Service) -> bool:
    """Whether a service's endpoints come from its EndpointSlices: a Kubernetes Service without
    a selector (an empty one is none, as in Kubernetes)."""
    return svc.kind == "Service" and svc.selector is None


def service_document_key(ref: ServiceRef) -> str:
    """The store key of the Service a slice belongs to (what the builder marks dirty)."""
    return keys.config("Service", *ref)


class SliceIndex:
    """The EndpointSlices the builder holds, by service and by endpoint address."""

    def __init__(self) -> None:
        self._slices: dict[str, EndpointSlice] = {}
        self._by_service: dict[ServiceRef, Members] = {}
        self._by_address: dict[str, Members] = {}

    def __len__(self) -> int:
        return len(self._slices)

    def file(self, key: str, es: EndpointSlice, *, add: bool) -> ServiceRef | None:
        """File (or unfile) one slice; the service whose endpoints it changes, if any."""
        if not es.service:
            return None  # not a Service's slice: no endpoints come from it
        op = membership.add if add else membership.discard
        if add:
            self._slices[key] = es
        else:
            self._slices.pop(key, None)
        ref = (es.namespace, es.service)
        op(self._by_service, ref, key)
        for ep in es.endpoints:
            op(self._by_address, ep.address, key)
        return ref

    def services_at(self, address: str) -> Iterator[ServiceRef]:
        """The services with a slice naming `address` (a workload there changes them)."""
        for key in each(self._by_address.get(address)):
            es = self._slices[key]
            yield (es.namespace, es.service)

    def endpoints(
        self, svc: Service, workload_at: Callable[[str], Workload | None]
    ) -> Mapping[int, tuple[Endpoint, ...]]:
        """A selector-less Service's endpoints per service port, from its slices (see the
        module doc); `workload_at(ip)` is the snapshot's workload at an address."""
        slices = sorted(
            (self._slices[k] for k in each(self._by_service.get((svc.namespace, svc.name)))),
            key=lambda es: es.name,
        )
        out: dict[int, tuple[Endpoint, ...]] = {}
        for port in svc.ports:
            found: dict[tuple[str, int], int] = {}  # address:port → its best rank
            for es in slices:
                number = _number_for(es, port.name, port.protocol)
                if number is None:
                    continue
                for ep in es.endpoints:
                    k = (ep.address, number)
                    found[k] = max(found.get(k, _UNUSABLE), _rank(ep))
            chosen = [k for k, rank in found.items() if rank == _READY]
            if not chosen:  # kube-proxy: no ready endpoint, then the serving terminating ones
                chosen = [k for k, rank in found.items() if rank == _DRAINING]
            eps = []
            for address, number in chosen:
                wl = workload_at(address)
                if wl is None:
                    eps.append(Endpoint(address, number, None, EMPTY))
                elif wl.healthy:  # an Unhealthy one: its agent cannot terminate mTLS yet
                    eps.append(Endpoint(address, number, wl, wl.labels))
            out[port.port] = tuple(eps)
        return MappingProxyType(out)


_UNUSABLE, _DRAINING, _READY = 0, 1, 2


def _rank(ep: SliceEndpoint) -> int:
    if ep.ready:
        return _READY
    return _DRAINING if ep.serving and ep.terminating else _UNUSABLE


def _number_for(es: EndpointSlice, name: str, protocol: str) -> int | None:
    for p in es.ports:
        if p.name == name and p.protocol == protocol:
            return p.port
    return None
