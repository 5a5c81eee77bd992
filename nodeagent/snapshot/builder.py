"""SnapshotBuilder: store documents in, the next immutable Snapshot out, incrementally.

Pure and sans-IO. The builder holds every raw document (key → KeyValue), its converted resource,
and private membership maps (`members.py`: index key → the document keys filed under it: ip →
workloads, host → services, (ns, label, value) → workloads…). Applying a batch of store events
only updates those maps and records which index entries became dirty; publishing then
recomputes exactly the dirty entries in the snapshot's persistent maps (`immutables.Map`:
O(log n) per entry, every untouched entry shared with the previous snapshot). One workload
event therefore costs its own index entries plus the endpoint lists of the services selecting
it, whatever the size of the mesh. A full build is the same path from an empty builder, which is
what makes "incremental == full rebuild" hold by construction (and tests check it).

A document that fails to decode or convert is logged with its key and left out, as if absent: the
snapshot is always a function of the current documents, never of their history.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from immutables import Map, MapMutation

from nodeagent.log import get_logger
from nodeagent.snapshot import hosts
from nodeagent.snapshot import members as membership
from nodeagent.snapshot.convert import Context, convert, parse_key
from nodeagent.snapshot.endpointslices import (
    SliceIndex,
    service_document_key,
    uses_endpoint_slices,
)
from nodeagent.snapshot.errors import ConvertError
from nodeagent.snapshot.members import Members, as_set, each
from nodeagent.snapshot.model import (
    AuthorizationPolicy,
    DestinationRule,
    Endpoint,
    EndpointSlice,
    Gateway,
    PeerAuthentication,
    Resource,
    Service,
    ServiceTarget,
    VirtualService,
    Workload,
)
from nodeagent.snapshot.request_authn import RequestAuthentication
from nodeagent.snapshot.snapshot import Indexes, ServiceKey, Snapshot
from nodeagent.store import codec
from nodeagent.store.base import Event, KeyValue

log = get_logger("snapshot.builder")

K = TypeVar("K")

_COUNT_NAMES = {
    "Workload": "workloads",
    "Service": "services",
    "ServiceEntry": "service_entries",
    "VirtualService": "virtual_services",
    "DestinationRule": "destination_rules",
    "Gateway": "gateways",
    "AuthorizationPolicy": "authorization_policies",
    "RequestAuthentication": "request_authentications",
    "PeerAuthentication": "peer_authentications",
    "EndpointSlice": "endpoint_slices",
}


# A batch at least this large pauses the cyclic garbage collector (`_collector_paused`).
BULK_EVENTS = 512


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """A bulk load allocates ~10^6 long-lived, acyclic objects (resources, index entries); the
    cyclic collector would traverse the growing heap again and again meanwhile (~40% of a full
    build). Reference counting still frees everything while it is paused."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _uid_node(wl: Workload) -> tuple[str, str]:
    return (wl.uid, wl.node)


def _service_rank(svc: Service) -> tuple[int, str, str]:
    return (0 if svc.kind == "Service" else 1, svc.namespace, svc.name)


def _ns_name(obj: Any) -> tuple[str, str]:
    return (obj.namespace, obj.name)


def _service_key(key: str) -> ServiceKey:
    ref = parse_key(key)
    assert ref is not None  # only service document keys are ever marked dirty here
    return (ref.kind, ref.namespace, ref.name)


class SnapshotBuilder:
    """Holds the raw documents and produces the next Snapshot from each batch of events."""

    def __init__(
        self,
        *,
        trust_domain: str = "cluster.local",
        cluster_domain: str = hosts.DEFAULT_CLUSTER_DOMAIN,
        root_namespace: str = "istio-system",
    ) -> None:
        self._ctx = Context(trust_domain=trust_domain, cluster_domain=cluster_domain)
        self._root_namespace = root_namespace
        self._revision = 0
        self._raw: dict[str, KeyValue] = {}
        self._objects: dict[str, Resource] = {}
        self._skipped: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._endpoint_total = 0
        # membership maps: index key → document keys
        self._m_uid: dict[str, Members] = {}
        self._m_ip: dict[str, Members] = {}
        self._m_node: dict[str, Members] = {}
        self._m_identity: dict[str, Members] = {}
        self._m_labels: dict[tuple[str, str, str], Members] = {}  # (ns, k, v) → workloads
        # Each selecting service is filed under ONE of its selector pairs: a workload matching
        # the whole selector carries that pair, so its labels find every candidate service.
        self._m_selector: dict[tuple[str, str, str], Members] = {}
        self._m_host: dict[str, Members] = {}
        self._m_vip: dict[str, Members] = {}
        self._m_route: dict[tuple[str, str], Members] = {}
        self._m_gateway_vs: dict[str, Members] = {}
        self._m_dr: dict[str, Members] = {}
        self._m_gateway: dict[str, Members] = {}
        self._m_ap: dict[str, Members] = {}
        self._m_ra: dict[str, Members] = {}
        self._m_pa: dict[str, Members] = {}
        self._slices = SliceIndex()  # EndpointSlices, by service and by address
        self._dirty: dict[str, set[Any]] = {}
        # For the sorted workload groups (by node, by identity): per group key, the workloads
        # filed (True) and unfiled (False) in this batch, in order, to edit the old tuple.
        self._group_ops: dict[str, dict[str, list[tuple[bool, Workload]]]] = {
            "node": {},
            "identity": {},
        }
        self._ix = Indexes()
        self._snapshot = self._make_snapshot()

    # -- public ------------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The last published snapshot."""
        return self._snapshot

    @property
    def revision(self) -> int:
        return self._revision

    def raw(self) -> list[KeyValue]:
        """Every document the builder holds (decodable or not), sorted by key: the disk cache."""
        return [self._raw[k] for k in sorted(self._raw)]

    def skipped(self) -> Mapping[str, str]:
        """Documents left out of the snapshot: key → why."""
        return MappingProxyType(self._skipped)

    def apply(self, events: Iterable[Event], *, revision: int = 0) -> Snapshot:
        """Apply a batch of store events (in revision order) and publish the next snapshot."""
        batch = list(events)
        with _collector_paused() if len(batch) >= BULK_EVENTS else contextlib.nullcontext():
            for event in batch:
                self._apply_one(event)
            self._revision = max(self._revision, revision)
            return self._publish()

    def reset(self, kvs: Iterable[KeyValue], revision: int) -> Snapshot:
        """Make the documents exactly `kvs` (a fresh listing read at `revision`), applying only
        the difference from what the builder holds: a re-list after compaction or a cache load."""
        events = []
        seen = set()
        for kv in kvs:
            seen.add(kv.key)  # keys the snapshot does not read are ignored by _apply_one
            old = self._raw.get(kv.key)
            if old is None or old.mod_revision != kv.mod_revision or old.value != kv.value:
                events.append(Event("put", kv))
        for key in self._raw.keys() - seen:
            events.append(Event("delete", KeyValue(key, b"", 0, revision, 0)))
        with _collector_paused():
            for event in events:
                self._apply_one(event)
            self._revision = revision
            return self._publish()

    @classmethod
    def build(cls, kvs: Iterable[KeyValue], revision: int, **params: str) -> SnapshotBuilder:
        """A builder holding `kvs`, its snapshot built in full."""
        builder = cls(**params)
        builder.reset(kvs, revision)
        return builder

    # -- applying events ---------------------------------------------------------------------

    def _apply_one(self, event: Event) -> None:
        kv = event.kv
        self._revision = max(self._revision, kv.mod_revision)
        ref = parse_key(kv.key)
        if ref is None:
            return
        old = self._objects.pop(kv.key, None)
        if old is not None:
            self._index(kv.key, old, add=False)
        self._skipped.pop(kv.key, None)
        if event.type == "delete":
            self._raw.pop(kv.key, None)
            return
        self._raw[kv.key] = kv
        try:
            obj = convert(kv.key, codec.decode(kv), self._ctx, ref)
        except (codec.DecodeError, ConvertError) as exc:
            self._skipped[kv.key] = str(exc)
            log.warning(
                "snapshot.document_skipped",
                key=kv.key,
                kind=ref.kind,
                namespace=ref.namespace,
                name=ref.name,
                error=str(exc),
            )
            return
        self._objects[kv.key] = obj
        self._index(kv.key, obj, add=True)

    def _dirt(self, name: str) -> set[Any]:
        found = self._dirty.get(name)
        if found is None:
            found = self._dirty[name] = set()
        return found

    def _index(self, key: str, obj: Resource, *, add: bool) -> None:
        """File (or unfile) one resource in the membership maps and mark what it dirties."""
        op = membership.add if add else membership.discard
        kind = type(obj).__name__ if not isinstance(obj, Service) else obj.kind
        self._counts[_COUNT_NAMES[kind]] += 1 if add else -1
        if isinstance(obj, Workload):
            self._index_workload(key, obj, op, add)
        elif isinstance(obj, Service):
            self._dirt("service").add(key)
            self._dirt("endpoints").add(key)
            for h in obj.hosts:
                op(self._m_host, h, key)
                self._dirt("host").add(h)
            for ip in obj.addresses:
                op(self._m_vip, ip, key)
                self._dirt("vip").add(ip)
            if obj.selector:
                op(self._m_selector, (obj.namespace, *min(obj.selector.items())), key)
        elif isinstance(obj, VirtualService):
            for gw in obj.gateways:
                # Per Gateway only: the mesh's own VirtualServices are found by host (`routes`),
                # and one tuple of all of them would be rebuilt on every VirtualService event.
                if gw != hosts.MESH_GATEWAY:
                    op(self._m_gateway_vs, gw, key)
                    self._dirt("gateway_vs").add(gw)
                for h in obj.hosts:
                    op(self._m_route, (gw, h), key)
                    self._dirt("route").add((gw, h))
        elif isinstance(obj, DestinationRule):
            op(self._m_dr, obj.host, key)
            self._dirt("dr").add(obj.host)
        elif isinstance(obj, Gateway):
            op(self._m_gateway, obj.ref, key)
            self._dirt("gateway").add(obj.ref)
        elif isinstance(obj, AuthorizationPolicy):
            op(self._m_ap, obj.namespace, key)
            self._dirt("ap").add(obj.namespace)
        elif isinstance(obj, RequestAuthentication):
            op(self._m_ra, obj.namespace, key)
            self._dirt("ra").add(obj.namespace)
        elif isinstance(obj, PeerAuthentication):
            op(self._m_pa, obj.namespace, key)
            self._dirt("pa").add(obj.namespace)
        elif isinstance(obj, EndpointSlice):
            service = self._slices.file(key, obj, add=add)
            if service is not None:
                self._dirt("endpoints").add(service_document_key(service))

    def _index_workload(
        self,
        key: str,
        wl: Workload,
        op: Callable[[dict[Any, Members], Any, str], None],
        add: bool,
    ) -> None:
        op(self._m_uid, wl.uid, key)
        self._dirt("uid").add(wl.uid)
        dirty_endpoints = self._dirt("endpoints")
        for ip in wl.addresses:
            op(self._m_ip, ip, key)
            self._dirt("ip").add(ip)
            for service in self._slices.services_at(ip):  # selector-less: by address
                dirty_endpoints.add(service_document_key(service))
        op(self._m_node, wl.node, key)
        self._group_ops["node"].setdefault(wl.node, []).append((add, wl))
        op(self._m_identity, wl.identity, key)
        self._group_ops["identity"].setdefault(wl.identity, []).append((add, wl))
        for k, v in wl.labels.items():
            op(self._m_labels, (wl.namespace, k, v), key)
            for svc_key in each(self._m_selector.get((wl.namespace, k, v))):
                svc = self._objects[svc_key]
                assert isinstance(svc, Service)
                assert svc.selector is not None
                if hosts.labels_match(svc.selector, wl.labels):
                    dirty_endpoints.add(svc_key)

    # -- publishing --------------------------------------------------------------------------

    def _best(self, members: Members) -> Any:
        """Of several documents claiming one unique index key, the most recently written."""
        if isinstance(members, str):
            return self._objects[members]
        return self._objects[max(members, key=lambda k: (self._raw[k].mod_revision, k))]

    def _publish(self) -> Snapshot:
        dirty, self._dirty = self._dirty, {}
        ix = self._ix
        changes: dict[str, Any] = {}
        mutations: dict[str, MapMutation[Any, Any]] = {}

        def cow(name: str) -> MapMutation[Any, Any]:
            found = mutations.get(name)
            if found is None:
                index: Map[Any, Any] = getattr(ix, name)
                found = mutations[name] = index.mutate()
            return found

        def refresh(
            name: str, dirty_name: str, multi: dict[Any, Members], make: Callable[[Members], Any]
        ) -> None:
            if not dirty.get(dirty_name):
                return
            target = cow(name)
            for k in dirty[dirty_name]:
                members = multi.get(k)
                if members:
                    target[k] = make(members)
                else:
                    target.pop(k, None)

        def sorted_objs(key: Callable[[Any], Any]) -> Callable[[Members], tuple[Any, ...]]:
            return lambda members: tuple(sorted((self._objects[m] for m in each(members)), key=key))

        by_name = sorted_objs(_ns_name)
        refresh("workloads_by_uid", "uid", self._m_uid, self._best)
        refresh("workloads_by_ip", "ip", self._m_ip, self._best)
        for name, group in (("workloads_by_node", "node"), ("workloads_by_identity", "identity")):
            ops, self._group_ops[group] = self._group_ops[group], {}
            if ops:
                self._regroup(cow(name), ops)
        if dirty.get("service"):
            services = cow("services")
            for key in dirty["service"]:
                obj = self._objects.get(key)
                if obj is None:
                    services.pop(_service_key(key), None)
                else:
                    assert isinstance(obj, Service)
                    services[(obj.kind, obj.namespace, obj.name)] = obj
        refresh("services_by_host", "host", self._m_host, sorted_objs(_service_rank))
        refresh("targets_by_vip", "vip", self._m_vip, self._vip_targets)
        refresh("routes", "route", self._m_route, by_name)
        refresh("virtual_services_by_gateway", "gateway_vs", self._m_gateway_vs, by_name)
        refresh("destination_rules", "dr", self._m_dr, by_name)
        refresh("gateways", "gateway", self._m_gateway, self._best)
        refresh("authorization_policies", "ap", self._m_ap, sorted_objs(lambda p: p.name))
        refresh("peer_authentications", "pa", self._m_pa, sorted_objs(lambda p: p.name))
        refresh("request_authentications", "ra", self._m_ra, sorted_objs(lambda p: p.name))
        if dirty.get("endpoints"):
            endpoints = cow("endpoints")
            for key in dirty["endpoints"]:
                svc_key = _service_key(key)
                old = endpoints.pop(svc_key, None)
                if old is not None:
                    self._endpoint_total -= sum(len(v) for v in old.values())
                obj = self._objects.get(key)
                if isinstance(obj, Service):
                    computed = self._compute_endpoints(obj)
                    endpoints[svc_key] = computed
                    self._endpoint_total += sum(len(v) for v in computed.values())
        if any(h.startswith("*") for h in dirty.get("host", ())):
            changes["service_wildcards"] = self._wildcards(self._m_host)
        if any(h.startswith("*") for h in dirty.get("dr", ())):
            changes["destination_rule_wildcards"] = self._wildcards(self._m_dr)
        wild_gateways = {gw for gw, h in dirty.get("route", ()) if h.startswith("*")}
        if wild_gateways:
            route_wildcards = cow("route_wildcards")
            for gw in wild_gateways:
                patterns = tuple(
                    sorted(
                        (h for g, h in self._m_route if g == gw and h.startswith("*")),
                        key=hosts.specificity,
                    )
                )
                if patterns:
                    route_wildcards[gw] = patterns
                else:
                    route_wildcards.pop(gw, None)
        counts = {name: self._counts[name] for name in _COUNT_NAMES.values()}
        counts["endpoints"] = self._endpoint_total
        counts["skipped"] = len(self._skipped)
        if counts != ix.counts:
            changes["counts"] = MappingProxyType(counts)
        for name, mutation in mutations.items():
            changes[name] = mutation.finish()
        if changes:
            self._ix = dataclasses.replace(ix, **changes)
        self._snapshot = self._make_snapshot()
        return self._snapshot

    @staticmethod
    def _regroup(
        target: MapMutation[str, tuple[Workload, ...]],
        ops: dict[str, list[tuple[bool, Workload]]],
    ) -> None:
        """Edit each changed group's sorted tuple by its few filings and unfilings (bisect),
        rather than re-sorting the node's 100s of pods: O(group) memory moves, O(ops log group)
        comparisons. (uid, node) is unique per document, so the order is the full sort's."""
        for k, changes in ops.items():
            group = list(target.get(k, ()))
            for add, wl in changes:
                if add:
                    bisect.insort(group, wl, key=_uid_node)
                else:
                    at = bisect.bisect_left(group, _uid_node(wl), key=_uid_node)
                    while group[at] is not wl:  # several versions of one key within a batch
                        at += 1
                    del group[at]
            if group:
                target[k] = tuple(group)
            else:
                target.pop(k, None)

    def _make_snapshot(self) -> Snapshot:
        return Snapshot(
            self._ix,
            revision=self._revision,
            trust_domain=self._ctx.trust_domain,
            cluster_domain=self._ctx.cluster_domain,
            root_namespace=self._root_namespace,
        )

    @staticmethod
    def _wildcards(multi: Mapping[str, Members]) -> tuple[str, ...]:
        # A scan of every host, but only when a wildcard host came or went in this batch.
        return tuple(sorted((h for h in multi if h.startswith("*")), key=hosts.specificity))

    def _vip_targets(self, members: Members) -> Mapping[int, ServiceTarget]:
        targets: dict[int, ServiceTarget] = {}
        services: list[Service] = [self._objects[m] for m in each(members)]  # type: ignore[misc]
        for svc in sorted(services, key=_service_rank):
            for port in svc.ports:
                targets.setdefault(port.port, ServiceTarget(svc, port))
        return MappingProxyType(targets)

    def _workload_at(self, ip: str) -> Workload | None:
        members = self._m_ip.get(ip)
        return None if members is None else self._best(members)

    def _compute_endpoints(self, svc: Service) -> Mapping[int, tuple[Endpoint, ...]]:
        if uses_endpoint_slices(svc):
            return self._slices.endpoints(svc, self._workload_at)
        workloads: list[Workload] = []
        if svc.selector:
            groups = sorted(
                (
                    as_set(self._m_labels.get((svc.namespace, k, v)))
                    for k, v in svc.selector.items()
                ),
                key=len,
            )
            members = groups[0].intersection(*groups[1:]) if groups[0] else set()
            found: list[Workload] = [self._objects[m] for m in members]  # type: ignore[misc]
            # An Unhealthy workload (its agent cannot terminate mTLS for it yet) is no endpoint.
            workloads = sorted(
                (w for w in found if w.addresses and w.healthy), key=lambda w: (w.uid, w.node)
            )
        out: dict[int, tuple[Endpoint, ...]] = {}
        for port in svc.ports:
            eps = []
            for wl in workloads:
                target = port.target_port
                if isinstance(target, str):
                    # Without the workload's named container ports, the service port number.
                    target = wl.ports.get(target, port.port)
                eps.append(Endpoint(wl.addresses[0], target, wl, wl.labels))
            for se in svc.static_endpoints:
                number = se.ports.get(port.name)
                if number is None:
                    number = port.target_port if isinstance(port.target_port, int) else port.port
                eps.append(Endpoint(se.address, number, None, se.labels, se.weight))
            out[port.port] = tuple(eps)
        return MappingProxyType(out)
