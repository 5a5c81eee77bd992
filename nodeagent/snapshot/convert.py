"""Store documents → snapshot resources, one document at a time, trusting nothing.

The config API validated these documents before writing them, but the snapshot re-checks every
field it reads: a document that does not convert raises ConvertError naming its key and field
path, and the builder skips that one document. The key is authoritative for kind, namespace and
name (a workload's node and uid too); the document's own metadata is not consulted for them.

Strings that repeat across many resources (namespaces, nodes, label keys and values, service
accounts, identities) are interned (`sys.intern`), so 50,000 workloads of 100 namespaces hold
100 namespace strings, not 50,000; interned strings are freed with their last user. Equal
label sets and named-port maps (every pod of one Deployment has the same) share one
`FrozenDict`, and equal service ports (and port lists) one ServicePort, through a bounded cache
(`frozen.share`).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, cast

from nodeagent.snapshot import hosts
from nodeagent.snapshot.endpointslices import convert_slice, parse_slice_key
from nodeagent.snapshot.errors import ConvertError
from nodeagent.snapshot.frozen import FrozenDict, share
from nodeagent.snapshot.model import (
    EMPTY,
    HEALTHY,
    UNHEALTHY,
    AuthorizationPolicy,
    DestinationRule,
    Gateway,
    MtlsMode,
    PeerAuthentication,
    Resource,
    Service,
    ServicePort,
    StaticEndpoint,
    Subset,
    VirtualService,
    Workload,
    freeze,
)
from nodeagent.snapshot.request_authn import (
    RequestAuthentication,
    RequestAuthnError,
    compile_request_authentication,
)
from nodeagent.snapshot.routes_compile import RouteError, compile_routes
from nodeagent.store import keys

KINDS = frozenset(
    [
        "Service",
        "ServiceEntry",
        "VirtualService",
        "DestinationRule",
        "Gateway",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
    ]
)
MTLS_MODES = frozenset(["UNSET", "DISABLE", "PERMISSIVE", "STRICT"])
ACTIONS = frozenset(["ALLOW", "DENY", "AUDIT"])
RESOLUTIONS = frozenset(["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"])
ENDPOINT_SLICE = "EndpointSlice"  # kube-sync's mirror, not a config kind (endpointslices.py)


@dataclass(frozen=True, slots=True)
class Context:
    """Build parameters that shape conversion."""

    trust_domain: str = "cluster.local"
    cluster_domain: str = hosts.DEFAULT_CLUSTER_DOMAIN


@dataclass(frozen=True, slots=True)
class KeyRef:
    """What a store key names: a config document (kind/ns/name), a workload (node/uid) or a
    mirrored EndpointSlice (ns/name)."""

    kind: str  # a config kind, "Workload" or "EndpointSlice"
    namespace: str  # for a workload: its node
    name: str  # for a workload: its uid


def parse_key(key: str) -> KeyRef | None:
    """The resource a key names, or None when the key is not one the snapshot reads."""
    if key.startswith(keys.CONFIG):
        parts = key[len(keys.CONFIG) :].split("/")
        if len(parts) == 3 and parts[0] in KINDS and all(parts):
            return KeyRef(sys.intern(parts[0]), sys.intern(parts[1]), parts[2])
        return None
    if key.startswith(keys.WORKLOADS):
        parts = key[len(keys.WORKLOADS) :].split("/")
        if len(parts) == 2 and all(parts):
            return KeyRef("Workload", sys.intern(parts[0]), parts[1])
        return None
    found = parse_slice_key(key)
    return None if found is None else KeyRef(ENDPOINT_SLICE, *found)


_UNSET: Any = object()


def _shared(items: dict[Any, Any]) -> Mapping[Any, Any]:
    """One read-only mapping per distinct content (`items` is the caller's fresh dict)."""
    return share(FrozenDict(items))


# Dotted field paths, split once: conversion reads the same few dozen paths from every document.
_PATHS: dict[str, tuple[str, ...]] = {}


class _Doc:
    """Typed, path-tracking reads from one decoded document."""

    def __init__(self, key: str, doc: Any) -> None:
        self.key = key
        if not isinstance(doc, dict):
            raise ConvertError(key, "", f"document is a {type(doc).__name__}, not a map")
        self.doc = doc

    def fail(self, path: str, reason: str) -> ConvertError:
        return ConvertError(self.key, path, reason)

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.doc
        parts = _PATHS.get(path)
        if parts is None:
            parts = _PATHS[path] = tuple(path.split("."))
        for part in parts:
            if not isinstance(node, dict):
                raise self.fail(path, "parent is not a map")
            node = node.get(part)
            if node is None:
                return default
        return node

    def mapping(self, path: str, node: Any = _UNSET, *, required: bool = False) -> dict[str, Any]:
        value = self.get(path) if node is _UNSET else node
        if value is None:
            if required:
                raise self.fail(path, "is required")
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a map, not {type(value).__name__}")
        return value

    def seq(self, path: str, node: Any = _UNSET) -> list[Any]:
        value = self.get(path) if node is _UNSET else node
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, not {type(value).__name__}")
        return value

    def text(self, path: str, node: Any = _UNSET, *, default: str | None = None) -> str:
        value = self.get(path) if node is _UNSET else node
        if value is None:
            if default is None:
                raise self.fail(path, "is required")
            return default
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, not {type(value).__name__}")
        return value

    def port(self, path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise self.fail(path, f"{value!r} is not a port number")
        return value

    def labels(self, path: str, node: Any = _UNSET) -> Mapping[str, str]:
        value = self.mapping(path, node)
        if not value:
            return EMPTY
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise self.fail(path, f"label {k!r}: {v!r} is not a string pair")
        return cast(
            Mapping[str, str], _shared({sys.intern(k): sys.intern(v) for k, v in value.items()})
        )

    def selector(self, path: str) -> Mapping[str, str] | None:
        """A `selector: {matchLabels: …}`; None when absent (absent and `{}` differ in Istio)."""
        node = self.get(path)
        if node is None:
            return None
        return self.labels(f"{path}.matchLabels", self.mapping(path, node).get("matchLabels"))


def _ip(d: _Doc, path: str, value: Any) -> str:
    if isinstance(value, str) and "." in value and ":" not in value:
        # The common IPv4 case at C speed; inet_pton, like ipaddress, takes only 4 decimal
        # octets without leading zeros, so what it accepts and re-prints is already canonical.
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value))
        except OSError:
            pass  # ipaddress names the problem
    try:
        return ipaddress.ip_address(d.text(path, value)).compressed
    except ValueError:
        raise d.fail(path, f"{value!r} is not an IP address") from None


def convert(key: str, doc: Any, ctx: Context, ref: KeyRef | None = None) -> Resource:
    """Convert the decoded document stored at `key` (`ref`: its parse_key, when the caller has
    it already); ConvertError when it does not convert."""
    ref = ref or parse_key(key)
    if ref is None:
        raise ConvertError(key, "", "not a config, workload or EndpointSlice key")
    if ref.kind == ENDPOINT_SLICE:
        return convert_slice(key, doc, ref.namespace, ref.name)
    d = _Doc(key, doc)
    resource: Resource = _CONVERTERS[ref.kind](d, ref, ctx)
    return resource


def _workload(d: _Doc, ref: KeyRef, ctx: Context) -> Workload:
    namespace = sys.intern(d.text("metadata.namespace"))
    sa = sys.intern(d.text("spec.serviceAccount", default="default"))
    addresses = tuple(
        _ip(d, f"spec.addresses[{i}]", a) for i, a in enumerate(d.seq("spec.addresses"))
    )
    ports: dict[str, int] = {}
    for i, p in enumerate(d.seq("spec.ports")):
        entry = d.mapping(f"spec.ports[{i}]", p)
        if "name" in entry:
            ports[sys.intern(d.text(f"spec.ports[{i}].name", entry["name"]))] = d.port(
                f"spec.ports[{i}].containerPort", entry.get("containerPort")
            )
    # No status (meshctl apply drops it; agents before it wrote none): Healthy, as before.
    status = d.text("status.health", default=HEALTHY)
    if status not in (HEALTHY, UNHEALTHY):
        raise d.fail("status.health", f"{status!r} is not {HEALTHY} or {UNHEALTHY}")
    return Workload(
        uid=ref.name,
        name=d.text("metadata.name"),
        namespace=namespace,
        node=ref.namespace,
        addresses=addresses,
        labels=d.labels("metadata.labels"),
        annotations=d.labels("metadata.annotations"),
        service_account=sa,
        identity=sys.intern(f"spiffe://{ctx.trust_domain}/ns/{namespace}/sa/{sa}"),
        ports=cast(Mapping[str, int], _shared(ports)) if ports else EMPTY,
        status=HEALTHY if status == HEALTHY else UNHEALTHY,
    )


def _service(d: _Doc, ref: KeyRef, ctx: Context) -> Service:
    ports = []
    for i, p in enumerate(d.seq("spec.ports")):
        path = f"spec.ports[{i}]"
        entry = d.mapping(path, p)
        number = d.port(f"{path}.port", entry.get("port"))
        target = entry.get("targetPort", number)
        if isinstance(target, str):
            if target.isdigit():
                target = int(target)
            elif not target:
                raise d.fail(f"{path}.targetPort", "is empty")
            else:
                target = sys.intern(target)
        if isinstance(target, int):
            target = d.port(f"{path}.targetPort", target)
        app = entry.get("appProtocol")
        protocol = d.text(f"{path}.protocol", entry.get("protocol"), default="TCP").upper()
        port = ServicePort(
            name=sys.intern(d.text(f"{path}.name", entry.get("name"), default="")),
            port=number,
            target_port=target,
            protocol=sys.intern(protocol),
            app_protocol=None if app is None else sys.intern(d.text(f"{path}.appProtocol", app)),
        )
        ports.append(share(port))
    cluster_ip = d.get("spec.clusterIP")
    headless = cluster_ip == "None"
    addresses: tuple[str, ...] = ()
    if cluster_ip not in (None, "", "None"):
        addresses = (_ip(d, "spec.clusterIP", cluster_ip),)
    selector_node = d.get("spec.selector")
    selector = None if not selector_node else d.labels("spec.selector")
    return Service(
        kind="Service",
        namespace=ref.namespace,
        name=ref.name,
        hosts=(f"{ref.name}.{ref.namespace}.svc.{ctx.cluster_domain}",),
        addresses=addresses,
        ports=share(tuple(ports)),
        selector=selector,
        headless=headless,
    )


def _service_entry(d: _Doc, ref: KeyRef, ctx: Context) -> Service:
    entry_hosts = tuple(
        hosts.normalize(d.text(f"spec.hosts[{i}]", h)) for i, h in enumerate(d.seq("spec.hosts"))
    )
    if not entry_hosts:
        raise d.fail("spec.hosts", "is required")
    addresses = []
    for i, a in enumerate(d.seq("spec.addresses")):
        text = d.text(f"spec.addresses[{i}]", a)
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise d.fail(f"spec.addresses[{i}]", f"{text!r} is not an IP or CIDR") from None
        # Only single-host addresses are indexed for find_address (see docs/snapshot.md).
        if net.num_addresses == 1:
            addresses.append(net.network_address.compressed)
    ports = []
    for i, p in enumerate(d.seq("spec.ports")):
        path = f"spec.ports[{i}]"
        entry = d.mapping(path, p)
        number = d.port(f"{path}.number", entry.get("number"))
        target = entry.get("targetPort")
        protocol = d.text(f"{path}.protocol", entry.get("protocol"), default="TCP").upper()
        ports.append(
            ServicePort(
                name=d.text(f"{path}.name", entry.get("name"), default=""),
                port=number,
                target_port=number if target is None else d.port(f"{path}.targetPort", target),
                protocol="UDP" if protocol == "UDP" else "TCP",
                app_protocol=protocol.lower(),
            )
        )
    resolution = d.text("spec.resolution", default="NONE")
    if resolution not in RESOLUTIONS:
        raise d.fail("spec.resolution", f"{resolution!r} is not one of {sorted(RESOLUTIONS)}")
    location = d.text("spec.location", default="MESH_EXTERNAL")
    if location not in ("MESH_INTERNAL", "MESH_EXTERNAL"):
        raise d.fail("spec.location", f"{location!r} is not MESH_INTERNAL or MESH_EXTERNAL")
    endpoints = []
    for i, e in enumerate(d.seq("spec.endpoints")):
        path = f"spec.endpoints[{i}]"
        entry = d.mapping(path, e)
        address = d.text(f"{path}.address", entry.get("address"))
        try:
            address = ipaddress.ip_address(address).compressed
        except ValueError:
            address = hosts.normalize(address)  # a DNS name (resolution DNS)
        named = d.mapping(f"{path}.ports", entry.get("ports"))
        endpoints.append(
            StaticEndpoint(
                address=address,
                ports=freeze({str(k): d.port(f"{path}.ports.{k}", v) for k, v in named.items()}),
                labels=d.labels(f"{path}.labels", entry.get("labels")),
                weight=int(entry.get("weight") or 0),
            )
        )
    ws = d.get("spec.workloadSelector")
    selector = None
    if ws is not None:
        labels = d.labels(
            "spec.workloadSelector.labels", d.mapping("spec.workloadSelector").get("labels")
        )
        selector = labels or None  # an empty workloadSelector selects nothing
    return Service(
        kind="ServiceEntry",
        namespace=ref.namespace,
        name=ref.name,
        hosts=entry_hosts,
        addresses=tuple(addresses),
        ports=tuple(ports),
        selector=selector,
        resolution=resolution,
        location=cast(Literal["MESH_INTERNAL", "MESH_EXTERNAL"], location),
        static_endpoints=tuple(endpoints),
    )


def _virtual_service(d: _Doc, ref: KeyRef, ctx: Context) -> VirtualService:
    vs_hosts = tuple(
        hosts.qualify(d.text(f"spec.hosts[{i}]", h), ref.namespace, ctx.cluster_domain)
        for i, h in enumerate(d.seq("spec.hosts"))
    )
    gateways = tuple(
        dict.fromkeys(
            hosts.gateway_ref(d.text(f"spec.gateways[{i}]", g), ref.namespace)
            for i, g in enumerate(d.seq("spec.gateways"))
        )
    )
    try:
        http, tcp, tls = compile_routes(
            d.mapping("spec"),
            namespace=ref.namespace,
            name=ref.name,
            cluster_domain=ctx.cluster_domain,
        )
    except RouteError as exc:
        raise d.fail(exc.path, exc.reason) from None
    return VirtualService(
        namespace=ref.namespace,
        name=ref.name,
        hosts=tuple(dict.fromkeys(vs_hosts)),
        gateways=gateways or (hosts.MESH_GATEWAY,),
        http=http,
        tcp=tcp,
        tls=tls,
    )


def _destination_rule(d: _Doc, ref: KeyRef, ctx: Context) -> DestinationRule:
    subsets: dict[str, Subset] = {}
    for i, s in enumerate(d.seq("spec.subsets")):
        path = f"spec.subsets[{i}]"
        entry = d.mapping(path, s)
        name = d.text(f"{path}.name", entry.get("name"))
        policy = entry.get("trafficPolicy")
        subsets[name] = Subset(
            name=name,
            labels=d.labels(f"{path}.labels", entry.get("labels")),
            traffic_policy=None
            if policy is None
            else freeze(d.mapping(f"{path}.trafficPolicy", policy)),
        )
    policy = d.get("spec.trafficPolicy")
    return DestinationRule(
        namespace=ref.namespace,
        name=ref.name,
        host=hosts.qualify(d.text("spec.host"), ref.namespace, ctx.cluster_domain),
        subsets=freeze(subsets),
        traffic_policy=None if policy is None else freeze(d.mapping("spec.trafficPolicy")),
        export_to=tuple(
            d.text(f"spec.exportTo[{i}]", e) for i, e in enumerate(d.seq("spec.exportTo"))
        ),
    )


def _gateway(d: _Doc, ref: KeyRef, ctx: Context) -> Gateway:
    servers = tuple(
        freeze(d.mapping(f"spec.servers[{i}]", s, required=True))
        for i, s in enumerate(d.seq("spec.servers"))
    )
    return Gateway(
        namespace=ref.namespace,
        name=ref.name,
        selector=d.labels("spec.selector"),
        servers=servers,
    )


def _authorization_policy(d: _Doc, ref: KeyRef, ctx: Context) -> AuthorizationPolicy:
    action = d.text("spec.action", default="ALLOW")
    if action not in ACTIONS:
        raise d.fail("spec.action", f"{action!r} is not supported (one of {sorted(ACTIONS)})")
    rules = tuple(
        freeze(d.mapping(f"spec.rules[{i}]", r, required=True))
        for i, r in enumerate(d.seq("spec.rules"))
    )
    return AuthorizationPolicy(
        namespace=ref.namespace,
        name=ref.name,
        action=cast(Literal["ALLOW", "DENY", "AUDIT"], action),
        selector=d.selector("spec.selector"),
        rules=rules,
    )


def _mode(d: _Doc, path: str, node: Any) -> MtlsMode:
    mode = d.text(f"{path}.mode", d.mapping(path, node).get("mode"), default="UNSET")
    if mode not in MTLS_MODES:
        raise d.fail(f"{path}.mode", f"{mode!r} is not one of {sorted(MTLS_MODES)}")
    return cast(MtlsMode, mode)


def _peer_authentication(d: _Doc, ref: KeyRef, ctx: Context) -> PeerAuthentication:
    port_modes: dict[int, MtlsMode] = {}
    for port, mtls in d.mapping("spec.portLevelMtls").items():
        path = f"spec.portLevelMtls.{port}"
        number = int(port) if isinstance(port, str) and port.isdigit() else port
        port_modes[d.port(path, number)] = _mode(d, path, mtls)
    return PeerAuthentication(
        namespace=ref.namespace,
        name=ref.name,
        selector=d.selector("spec.selector"),
        mode=_mode(d, "spec.mtls", d.get("spec.mtls")),
        port_modes=MappingProxyType(port_modes) if port_modes else EMPTY,
    )


def _request_authentication(d: _Doc, ref: KeyRef, ctx: Context) -> RequestAuthentication:
    try:
        return compile_request_authentication(
            ref.namespace, ref.name, d.mapping("spec"), d.selector("spec.selector")
        )
    except RequestAuthnError as exc:
        raise d.fail(exc.path, exc.reason) from None


_CONVERTERS: dict[str, Any] = {
    "Workload": _workload,
    "Service": _service,
    "ServiceEntry": _service_entry,
    "VirtualService": _virtual_service,
    "DestinationRule": _destination_rule,
    "Gateway": _gateway,
    "AuthorizationPolicy": _authorization_policy,
    "PeerAuthentication": _peer_authentication,
    "RequestAuthentication": _request_authentication,
}
