"""The snapshot's typed resources: frozen, converted once from store documents, shared freely.

Every mapping inside is read-only (`frozen.FrozenDict` for labels, selectors and named ports,
shared by content; `types.MappingProxyType` otherwise) and every list a tuple, so a resource
handed to the proxy can never change under it. A VirtualService's routes are compiled into typed
routes (`routes.py`); other raw Istio sub-documents (DestinationRule traffic policies,
AuthorizationPolicy rules, Gateway servers) are kept as frozen mappings in Istio's own shape.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from nodeagent.snapshot.request_authn import RequestAuthentication
from nodeagent.snapshot.routes import HttpRoute, TcpRoute

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
Action = Literal["ALLOW", "DENY", "AUDIT"]
# ztunnel's workload health: only a Healthy workload is a service endpoint (its agent can
# terminate mTLS for it); an Unhealthy one is still known by address, uid and node.
WorkloadStatus = Literal["Healthy", "Unhealthy"]
HEALTHY: WorkloadStatus = "Healthy"
UNHEALTHY: WorkloadStatus = "Unhealthy"

EMPTY: Mapping[Any, Any] = MappingProxyType({})


def freeze(value: Any) -> Any:
    """A deep read-only copy of a decoded document: dicts → mappingproxy, lists → tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod (or VM) registered by the agent of its node."""

    uid: str
    name: str
    namespace: str
    node: str
    addresses: tuple[str, ...]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    service_account: str
    identity: str  # spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
    # Named container ports (`spec.ports: [{name, containerPort}]`) when the registrar knows
    # them; a named targetPort without an entry here falls back to the service port number.
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    status: WorkloadStatus = HEALTHY

    @property
    def healthy(self) -> bool:
        return self.status == HEALTHY

    @property
    def address(self) -> str | None:
        return self.addresses[0] if self.addresses else None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str  # a number, or a container port name
    protocol: str = "TCP"  # the L4 protocol: TCP, UDP, SCTP
    app_protocol: str | None = None  # appProtocol, or a ServiceEntry port's protocol

    @property
    def protocol_hint(self) -> str:
        """The L7 protocol by Istio's rules: appProtocol, else the port name's prefix.

        One of http, http2, grpc, https, tls, tcp, mongo, redis, mysql…; "unknown" when neither
        says (the proxy then sniffs or treats it as opaque TCP).
        """
        if self.protocol.upper() == "UDP":
            return "udp"
        if self.app_protocol:
            return self.app_protocol.lower().removeprefix("kubernetes.io/")
        prefix = self.name.split("-", 1)[0].lower()  # "grpc-web-x" is grpc, as in Istio
        return prefix if prefix in _KNOWN_PROTOCOLS else "unknown"

    @property
    def l7_protocol(self) -> L7Protocol:
        """How the proxy treats this port (`protocol_hint` → the one place that says it)."""
        return L7Protocol.of(self.protocol_hint)


_KNOWN_PROTOCOLS = frozenset(
    ["http", "http2", "grpc", "grpc-web", "h2c", "https", "tls", "tcp", "mongo", "redis", "mysql"]
)


class L7Protocol(enum.Enum):
    """What the outbound proxy speaks on a service port (Istio's protocol selection).

    HTTP1: `http` (HTTP/1.1 upstream; an h2 client is translated). HTTP2: `http2`, `grpc`,
    `grpc-web`, `h2c` by port name prefix or appProtocol (`kubernetes.io/h2c` included): HTTP/2
    upstream, an HTTP/1.1 client translated (Envoy's codec AUTO; `http2.selection`). SNIFF:
    nothing declared (`unknown`): the first bytes decide (an HTTP/2 preface, an HTTP/1.x
    request line, else TCP). OPAQUE: everything else (tcp, tls, https, mongo, udp…): relayed
    at L4.
    """

    HTTP1 = "http"
    HTTP2 = "http2"
    SNIFF = "sniff"
    OPAQUE = "tcp"

    @classmethod
    def of(cls, hint: str) -> L7Protocol:
        if hint == "http":
            return cls.HTTP1
        if hint in _HTTP2_HINTS:
            return cls.HTTP2
        if hint == "unknown":
            return cls.SNIFF
        return cls.OPAQUE


_HTTP2_HINTS = frozenset({"http2", "grpc", "grpc-web", "h2c"})


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    """A ServiceEntry `endpoints` entry (resolution STATIC or DNS)."""

    address: str
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    weight: int = 0


@dataclass(frozen=True, slots=True)
class Service:
    """A Kubernetes Service or an Istio ServiceEntry, in one shape.

    `hosts` are FQDNs (a Service has exactly one, `name.ns.svc.<cluster-domain>`); `addresses`
    are the VIPs (none for a headless Service or an unallocated one). `selector` picks the
    workloads of `namespace` that serve it (None: no selected endpoints).
    """

    kind: Literal["Service", "ServiceEntry"]
    namespace: str
    name: str
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] | None
    headless: bool = False
    # ServiceEntry: NONE, STATIC, DNS, DNS_ROUND_ROBIN; a Kubernetes Service is STATIC.
    resolution: str = "STATIC"
    location: Literal["MESH_INTERNAL", "MESH_EXTERNAL"] = "MESH_INTERNAL"
    static_endpoints: tuple[StaticEndpoint, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return self.hosts[0]

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """What a connection to a service VIP:port addresses: the service and its port."""

    service: Service
    port: ServicePort


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of a service port: where to connect, and the workload behind it (if any)."""

    address: str
    port: int
    workload: Workload | None = None  # None for a ServiceEntry static endpoint
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    weight: int = 0


@dataclass(frozen=True, slots=True)
class VirtualService:
    """A VirtualService with its routes compiled (`snapshot.routes`) when it was converted."""

    namespace: str
    name: str
    hosts: tuple[str, ...]  # qualified with the VirtualService's namespace
    gateways: tuple[str, ...]  # "mesh" or "namespace/name"; none given means ("mesh",)
    http: tuple[HttpRoute, ...] = ()
    tcp: tuple[TcpRoute, ...] = ()
    tls: tuple[TcpRoute, ...] = ()  # `tls` routes: L4 routes whose matches carry sniHosts

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    traffic_policy: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    namespace: str
    name: str
    host: str  # qualified with the DestinationRule's namespace
    subsets: Mapping[str, Subset]
    traffic_policy: Mapping[str, Any] | None = None
    export_to: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def subset(self, name: str) -> Subset | None:
        return self.subsets.get(name)


@dataclass(frozen=True, slots=True)
class Gateway:
    namespace: str
    name: str
    selector: Mapping[str, str]
    servers: tuple[Mapping[str, Any], ...]

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: Action
    selector: Mapping[str, str] | None  # None: every workload of the namespace
    rules: tuple[
        Mapping[str, Any], ...
    ]  # Istio's rules (from/to/when); none under ALLOW = deny all

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class AuthorizationPolicies:
    """The policies that apply to one workload, split by action, each in a stable order."""

    allow: tuple[AuthorizationPolicy, ...] = ()
    deny: tuple[AuthorizationPolicy, ...] = ()
    audit: tuple[AuthorizationPolicy, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    namespace: str
    name: str
    selector: Mapping[str, str] | None  # None: namespace-wide (mesh-wide in the root namespace)
    mode: MtlsMode
    port_modes: Mapping[int, MtlsMode] = field(default_factory=lambda: EMPTY)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class SlicePort:
    """An EndpointSlice `ports[]` entry: the number behind the Service port of the same name."""

    name: str  # "" for a Service's one unnamed port
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """An EndpointSlice `endpoints[]` entry, at its first address (kube-proxy uses only that),
    with its conditions as Kubernetes means them (unset ready/serving: true; terminating:
    false)."""

    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """One EndpointSlice kube-sync mirrored: the endpoints of Service `service` (its
    `kubernetes.io/service-name` label; "" when it has none) in `namespace`."""

    namespace: str
    name: str
    service: str
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


Resource = (
    Workload
    | Service
    | VirtualService
    | DestinationRule
    | Gateway
    | AuthorizationPolicy
    | RequestAuthentication
    | PeerAuthentication
    | EndpointSlice
)
