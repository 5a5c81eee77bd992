"""The snapshot: one immutable, indexed view of the mesh that the proxy reads synchronously.

Every lookup is a dict access or two and returns None (or an empty tuple) on a miss; nothing here
awaits, locks or mutates. The builder (`builder.py`) produces a new Snapshot per batch of store
changes, sharing every index the batch did not touch with the previous one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from immutables import Map

from nodeagent.snapshot import hosts
from nodeagent.snapshot.model import (
    AuthorizationPolicies,
    AuthorizationPolicy,
    DestinationRule,
    Endpoint,
    Gateway,
    MtlsMode,
    PeerAuthentication,
    Service,
    ServicePort,
    ServiceTarget,
    VirtualService,
    Workload,
)
from nodeagent.snapshot.request_authn import JwtRule, RequestAuthentication

ServiceKey = tuple[str, str, str]  # (kind, namespace, name)

_EMPTY: Mapping[Any, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Indexes:
    """The snapshot's stores and explicit indexes. Never mutated once a Snapshot holds them.

    Each index is a persistent map (`immutables.Map`, a hash array mapped trie): the builder
    derives the next version of an index by changing a few entries, in O(log n), and the new
    version shares every other node with the old. That is what makes one workload event cost
    O(what it touches) rather than a copy of every index it appears in (see docs/snapshot.md).
    """

    workloads_by_uid: Map[str, Workload] = field(default_factory=Map)
    workloads_by_ip: Map[str, Workload] = field(default_factory=Map)
    workloads_by_node: Map[str, tuple[Workload, ...]] = field(default_factory=Map)
    workloads_by_identity: Map[str, tuple[Workload, ...]] = field(default_factory=Map)
    services: Map[ServiceKey, Service] = field(default_factory=Map)
    services_by_host: Map[str, tuple[Service, ...]] = field(default_factory=Map)
    service_wildcards: tuple[str, ...] = ()  # wildcard ServiceEntry hosts, most specific first
    # VIP → the services holding it, best first (a ServiceTarget is made per lookup)
    services_by_vip: Map[str, tuple[Service, ...]] = field(default_factory=Map)
    # per service: port → endpoints (a ServiceEndpoints: each list made on its first lookup)
    endpoints: Map[ServiceKey, Mapping[int, tuple[Endpoint, ...]]] = field(default_factory=Map)
    routes: Map[tuple[str, str], tuple[VirtualService, ...]] = field(default_factory=Map)
    route_wildcards: Map[str, tuple[str, ...]] = field(default_factory=Map)  # per gateway
    virtual_services_by_gateway: Map[str, tuple[VirtualService, ...]] = field(default_factory=Map)
    destination_rules: Map[str, tuple[DestinationRule, ...]] = field(default_factory=Map)
    destination_rule_wildcards: tuple[str, ...] = ()
    gateways: Map[str, Gateway] = field(default_factory=Map)
    authorization_policies: Map[str, tuple[AuthorizationPolicy, ...]] = field(default_factory=Map)
    peer_authentications: Map[str, tuple[PeerAuthentication, ...]] = field(default_factory=Map)
    request_authentications: Map[str, tuple[RequestAuthentication, ...]] = field(
        default_factory=Map
    )
    counts: Mapping[str, int] = field(default_factory=lambda: _EMPTY)


class Snapshot:
    """The mesh as of store revision `revision`. Build with SnapshotBuilder; never mutate."""

    __slots__ = ("_ix", "cluster_domain", "revision", "root_namespace", "trust_domain")

    def __init__(
        self,
        ix: Indexes,
        *,
        revision: int,
        trust_domain: str,
        cluster_domain: str,
        root_namespace: str,
    ) -> None:
        self._ix = ix
        self.revision = revision
        self.trust_domain = trust_domain
        self.cluster_domain = cluster_domain
        self.root_namespace = root_namespace

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(
            Indexes(),
            revision=0,
            trust_domain="cluster.local",
            cluster_domain=hosts.DEFAULT_CLUSTER_DOMAIN,
            root_namespace="istio-system",
        )

    @property
    def indexes(self) -> Indexes:
        """The raw indexes (read-only by contract), for tests, dumps and the admin socket."""
        return self._ix

    # -- addresses ---------------------------------------------------------------------------

    def find_address(self, ip: str, port: int) -> Workload | ServiceTarget | None:
        """What a connection to ip:port reaches: a service VIP port, else a workload, else None.

        A VIP with no such declared port is None (like kube-proxy, which rejects it).
        """
        services = self._ix.services_by_vip.get(ip)
        if services is not None:
            for svc in services:  # the best service declaring the port
                for declared in svc.ports:
                    if declared.port == port:
                        return ServiceTarget(svc, declared)
            return None
        workload = self._ix.workloads_by_ip.get(ip)
        if workload is None and ":" in ip and _canonical(ip) != ip:
            # IPv6 has many spellings; the indexes hold the canonical (compressed) one.
            return self.find_address(_canonical(ip), port)
        return workload

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._ix.workloads_by_ip.get(ip)

    # -- workloads ---------------------------------------------------------------------------

    def workload(self, uid: str) -> Workload | None:
        return self._ix.workloads_by_uid.get(uid)

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return self._ix.workloads_by_node.get(node, ())

    def workloads_with_identity(self, identity: str) -> tuple[Workload, ...]:
        return self._ix.workloads_by_identity.get(identity, ())

    def workloads(self) -> Iterator[Workload]:
        return iter(self._ix.workloads_by_uid.values())

    # -- services ----------------------------------------------------------------------------

    def service(self, namespace: str, name: str, kind: str = "Service") -> Service | None:
        return self._ix.services.get((kind, namespace, name))

    def services(self) -> Iterator[Service]:
        return iter(self._ix.services.values())

    def service_by_host(self, host: str) -> Service | None:
        """The service owning an exact host, else the most specific wildcard ServiceEntry host.

        When several claim a host, a Kubernetes Service wins over a ServiceEntry, then the
        lowest namespace/name.
        """
        host = hosts.normalize(host)
        found = self._ix.services_by_host.get(host)
        if found:
            return found[0]
        for pattern in self._ix.service_wildcards:
            if hosts.wildcard_matches(pattern, host):
                return self._ix.services_by_host[pattern][0]
        return None

    def resolve_host(self, name: str, from_namespace: str) -> Service | None:
        """A name as a client in `from_namespace` writes it: `svc`, `svc.ns`, `svc.ns.svc`,
        the FQDN, or a ServiceEntry host."""
        name = hosts.normalize(name)
        exact = self._ix.services_by_host.get(name)
        if exact:
            return exact[0]
        for candidate in hosts.expansions(name, from_namespace, self.cluster_domain):
            found = self._ix.services_by_host.get(candidate)
            if found:
                return found[0]
        return self.service_by_host(name)

    def endpoints(
        self,
        service: Service,
        port: int | ServicePort,
        *,
        subset: Mapping[str, str] | None = None,
    ) -> tuple[Endpoint, ...]:
        """The backends of one service port (by service port number), optionally only those
        whose labels match a DestinationRule subset's labels."""
        number = port.port if isinstance(port, ServicePort) else port
        per_port = self._ix.endpoints.get((service.kind, service.namespace, service.name))
        found = per_port.get(number, ()) if per_port is not None else ()
        if subset:
            return tuple(e for e in found if hosts.labels_match(subset, e.labels))
        return found

    def unhealthy_members(self, service: Service) -> tuple[Workload, ...]:
        """The workloads `service` selects that are no endpoints because they are Unhealthy
        (for explain and the admin socket; a scan, not an index: not for the data path)."""
        if not service.selector:
            return ()
        selector = service.selector
        return tuple(
            sorted(
                (
                    w
                    for w in self._ix.workloads_by_uid.values()
                    if not w.healthy
                    and w.namespace == service.namespace
                    and hosts.labels_match(selector, w.labels)
                ),
                key=lambda w: w.uid,
            )
        )

    def dns_addresses(self, service: Service) -> tuple[str, ...]:
        """What DNS answers for a service: its VIPs, or (headless) its endpoints' addresses."""
        if service.addresses:
            return service.addresses
        per_port = self._ix.endpoints.get((service.kind, service.namespace, service.name), _EMPTY)
        return tuple(dict.fromkeys(e.address for eps in per_port.values() for e in eps))

    # -- routing -----------------------------------------------------------------------------

    def routes_for(
        self, host: str, gateway: str = hosts.MESH_GATEWAY
    ) -> tuple[VirtualService, ...]:
        """The VirtualServices that apply to `host` (an FQDN or a request's Host) through
        `gateway` ("mesh" or "ns/name"), in the order their rules are tried: exact host first,
        then wildcard hosts from the most specific; within one host by namespace/name."""
        host = hosts.normalize(host)
        found = self._ix.routes.get((gateway, host), ())
        wildcards = self._ix.route_wildcards.get(gateway)
        if not wildcards:
            return found
        out = list(found)
        for pattern in wildcards:
            if hosts.wildcard_matches(pattern, host):
                out.extend(vs for vs in self._ix.routes[(gateway, pattern)] if vs not in out)
        return tuple(out)

    def virtual_services_for_gateway(self, gateway: str) -> tuple[VirtualService, ...]:
        """The VirtualServices bound to Gateway `gateway` ("ns/name"); not kept for "mesh"."""
        return self._ix.virtual_services_by_gateway.get(gateway, ())

    def destination_rule(
        self, host: str, from_namespace: str | None = None
    ) -> DestinationRule | None:
        """The DestinationRule for `host`: an exact host beats the most specific wildcard;
        among several for the same host, the client's namespace, then the host's service
        namespace, then the root namespace, then the lowest namespace/name."""
        host = hosts.normalize(host)
        found = self._ix.destination_rules.get(host)
        if not found:
            for pattern in self._ix.destination_rule_wildcards:
                if hosts.wildcard_matches(pattern, host):
                    found = self._ix.destination_rules[pattern]
                    break
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        service = self.service_by_host(host)
        for ns in (from_namespace, service.namespace if service else None, self.root_namespace):
            for dr in found:
                if dr.namespace == ns:
                    return dr
        return found[0]

    def gateway(self, ref: str) -> Gateway | None:
        """A Gateway by `namespace/name`."""
        return self._ix.gateways.get(ref)

    # -- security ----------------------------------------------------------------------------

    def authorization_policies_for(self, workload: Workload) -> AuthorizationPolicies:
        """Root-namespace policies (mesh-wide, or by selector in any namespace), then the
        workload namespace's policies (namespace-wide or selecting it), split by action."""
        allow: list[AuthorizationPolicy] = []
        deny: list[AuthorizationPolicy] = []
        audit: list[AuthorizationPolicy] = []
        by_action = {"ALLOW": allow, "DENY": deny, "AUDIT": audit}
        namespaces = dict.fromkeys((self.root_namespace, workload.namespace))
        for ns in namespaces:
            for policy in self._ix.authorization_policies.get(ns, ()):
                if policy.selector is None or hosts.labels_match(policy.selector, workload.labels):
                    by_action[policy.action].append(policy)
        return AuthorizationPolicies(tuple(allow), tuple(deny), tuple(audit))

    def peer_authentication_for(self, workload: Workload, port: int) -> MtlsMode:
        """The effective mTLS mode for inbound traffic to `workload` on (target) `port`.

        Istio's precedence: a workload-selector policy of the workload's namespace beats the
        namespace-wide policy, which beats the mesh-wide (root namespace, no selector) one; an
        UNSET mode inherits from the level above; a port-level mode of the workload policy
        overrides for that port. Nothing set at all: PERMISSIVE. Where Istio takes the oldest of
        several at one level, the snapshot (which has no creation times) takes the lowest name.
        """
        pas = self._ix.peer_authentications
        mesh = _first(p for p in pas.get(self.root_namespace, ()) if p.selector is None)
        own = pas.get(workload.namespace, ())
        namespace = _first(p for p in own if p.selector is None)
        selected = None
        if workload.namespace != self.root_namespace:
            selected = _first(
                p
                for p in own
                if p.selector is not None and hosts.labels_match(p.selector, workload.labels)
            )
        mode: MtlsMode = "PERMISSIVE"
        for level in (mesh, namespace, selected):
            if level is not None and level.mode != "UNSET":
                mode = level.mode
        if selected is not None:
            port_mode = selected.port_modes.get(port, "UNSET")
            if port_mode != "UNSET":
                return port_mode
        return mode

    def request_authentication_for(self, workload: Workload) -> tuple[JwtRule, ...]:
        """The JWT rules that apply to requests to `workload` (see `request_authentication_for_
        labels`)."""
        return self.request_authentication_for_labels(workload.namespace, workload.labels)

    def request_authentication_for_labels(
        self, namespace: str, labels: Mapping[str, str]
    ) -> tuple[JwtRule, ...]:
        """The JWT rules of every RequestAuthentication selecting a workload of `namespace`
        with `labels` (the ingress gateway's too), in Istio's order: the workload namespace's
        policies, then the root namespace's; within one namespace by name. A policy selects by
        `selector` (in the root namespace: workloads of any namespace), by `targetRef(s)` (the
        workloads a Service of its namespace selects), or, with neither, every workload of its
        namespace (the root namespace: the whole mesh)."""
        out: list[JwtRule] = []
        for ns in dict.fromkeys((namespace, self.root_namespace)):
            for policy in self._ix.request_authentications.get(ns, ()):
                if self._selects(policy, namespace, labels):
                    out.extend(policy.rules)
        return tuple(out)

    def _selects(
        self, policy: RequestAuthentication, namespace: str, labels: Mapping[str, str]
    ) -> bool:
        if policy.target_services:
            if policy.namespace != namespace:
                return False
            for name in policy.target_services:
                svc = self.service(policy.namespace, name)
                if svc is not None and svc.selector and hosts.labels_match(svc.selector, labels):
                    return True
            return False
        if policy.selector is not None:
            return hosts.labels_match(policy.selector, labels)
        return True

    # -- operations --------------------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """Counts for the admin socket and the bench."""
        return {"revision": self.revision, **self._ix.counts}

    def __repr__(self) -> str:
        return f"<Snapshot revision={self.revision} {dict(self._ix.counts)}>"


def _first(items: Iterator[PeerAuthentication]) -> PeerAuthentication | None:
    return next(items, None)


def _canonical(ip: str) -> str:
    try:
        return ipaddress.ip_address(ip).compressed
    except ValueError:
        return ip
