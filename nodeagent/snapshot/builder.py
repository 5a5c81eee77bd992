"""SnapshotBuilder: store documents in, the next immutable Snapshot out, incrementally.

Pure and sans-IO. The builder holds, per document, its converted resource and a stamp (mod
revision and checksum: what a re-list compares, not the document's bytes), and private membership
maps (`members.py`: index key → the document keys filed under it: (ns, label, value) →
workloads, host → services…; uid and IP are claimed in the index itself, see `_claim`).
Applying a batch of store events only updates those maps and records which index entries
became dirty; publishing then recomputes exactly the dirty entries in the snapshot's persistent
maps (`immutables.Map`: O(log n) per entry, every untouched entry shared with the previous
snapshot). One workload
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
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from immutables import Map, MapMutation

from nodeagent.log import get_logger
from nodeagent.snapshot import hosts
from nodeagent.snapshot import members as membership
from nodeagent.snapshot.convert import Context, convert, parse_key
from nodeagent.snapshot.endpoints import ServiceEndpoints
from nodeagent.snapshot.endpointslices import (
    SliceIndex,
    service_document_key,
    uses_endpoint_slices,
)
from nodeagent.snapshot.errors import ConvertError
from nodeagent.snapshot.frozen import PortMap, share
from nodeagent.snapshot.members import Members, as_set, each
from nodeagent.snapshot.model import (
    EMPTY,
    AuthorizationPolicy,
    DestinationRule,
    Endpoint,
    EndpointSlice,
    Gateway,
    PeerAuthentication,
    Resource,
    Service,
    VirtualService,
    Workload,
)
from nodeagent.snapshot.request_authn import RequestAuthentication
from nodeagent.snapshot.snapshot import Indexes, ServiceKey, Snapshot
from nodeagent.store import codec, keys
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


def _stamp(kv: KeyValue) -> int:
    """One version of a document: its mod revision and a checksum of its bytes (a store
    recreated from scratch reuses revisions). One int instead of the document."""
    return kv.mod_revision << 32 | zlib.crc32(kv.value)


def _endpoint_count(per_port: Mapping[int, tuple[Endpoint, ...]]) -> int:
    if isinstance(per_port, ServiceEndpoints):
        return per_port.total()  # without building the lists
    return sum(len(v) for v in per_port.values())


def _service_key(key: str) -> ServiceKey:
    ref = parse_key(key)
    assert ref is not None  # only service document keys are ever marked dirty here
    return (ref.kind, ref.namespace, ref.name)


class SnapshotBuilder:
    """Holds the converted documents and produces the next Snapshot from each batch of events.

    The raw documents are not kept (the disk cache is a journal of the events, written by
    SnapshotSync): a document costs its converted resource, its index entries and a stamp."""

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
        self._stamps: dict[str, int] = {}  # every document held (decodable or not) → _stamp
        self._objects: dict[str, Resource] = {}
        self._skipped: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._endpoint_total = 0
        # Unique keys (uid, IP) are claimed straight in the batch's persistent-map mutation;
        # only a key claimed by several documents gets a membership entry (its claimants, for
        # `_best`). One document per uid and per IP, the usual case, costs its map entry alone.
        self._contested: dict[str, dict[str, Members]] = {
            "workloads_by_uid": {},
            "workloads_by_ip": {},
        }
        self._mutations: dict[str, MapMutation[Any, Any]] = {}  # this batch's, until publish
        # membership maps: index key → document keys
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

    def documents(self) -> Collection[str]:
        """The keys of every document the builder holds, decodable or not (a live view)."""
        return self._stamps.keys()

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

    def reset(
        self, kvs: Iterable[KeyValue], revision: int, *, keep: Collection[str] = ()
    ) -> Snapshot:
        """Make the documents exactly `kvs` (a fresh listing read at `revision`), plus those
        held now whose keys are in `keep` (held deletions), applying only the difference from
        what the builder holds: a re-list after compaction or a cache load."""
        events = []
        seen = set()
        for kv in kvs:
            seen.add(kv.key)  # keys the snapshot does not read are ignored by _apply_one
            if self._stamps.get(kv.key) != _stamp(kv):
                events.append(Event("put", kv))
        for key in self._stamps.keys() - seen:
            if key not in keep:
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
            self._stamps.pop(kv.key, None)
            return
        self._stamps[kv.key] = _stamp(kv)
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
        self._claim("workloads_by_uid", wl.uid, key, wl, add)
        dirty_endpoints = self._dirt("endpoints")
        for ip in wl.addresses:
            self._claim("workloads_by_ip", ip, key, wl, add)
            for service in self._slices.services_at(ip):  # selector-less: by address
                dirty_endpoints.add(service_document_key(service))
        self._group_ops["node"].setdefault(wl.node, []).append((add, wl))
        self._group_ops["identity"].setdefault(wl.identity, []).append((add, wl))
        for k, v in wl.labels.items():
            op(self._m_labels, (wl.namespace, k, v), key)
            for svc_key in each(self._m_selector.get((wl.namespace, k, v))):
                svc = self._objects[svc_key]
                assert isinstance(svc, Service)
                assert svc.selector is not None
                if hosts.labels_match(svc.selector, wl.labels):
                    dirty_endpoints.add(svc_key)

    def _mutation(self, name: str) -> MapMutation[Any, Any]:
        """The batch's mutation of index `name` (copy on write; finished by `_publish`)."""
        found = self._mutations.get(name)
        if found is None:
            index: Map[Any, Any] = getattr(self._ix, name)
            found = self._mutations[name] = index.mutate()
        return found

    def _claim(self, name: str, k: str, key: str, wl: Workload, add: bool) -> None:
        """File (or unfile) workload `wl`, document `key`, as a claimant of `k` in the unique
        index `name`: the index holds the best claimant (`_best`)."""
        index = self._mutation(name)
        contested = self._contested[name]
        if k in contested:
            (membership.add if add else membership.discard)(contested, k, key)
            members = contested[k]
            if isinstance(members, str):  # one claimant left: uncontested again
                del contested[k]
            index[k] = self._best(members)
            return
        holder = index.get(k)
        if not add:
            if holder is wl:
                del index[k]
        elif holder is None or holder is wl:
            index[k] = wl
        else:  # a second claimant; a workload's key is a function of its node and uid
            contested[k] = (keys.workload(holder.node, holder.uid), key)
            index[k] = self._best(contested[k])

    # -- publishing --------------------------------------------------------------------------

    def _best(self, members: Members) -> Any:
        """Of several documents claiming one unique index key, the most recently written."""
        if isinstance(members, str):
            return self._objects[members]
        return self._objects[max(members, key=lambda k: (self._stamps[k] >> 32, k))]

    def _publish(self) -> Snapshot:
        dirty, self._dirty = self._dirty, {}
        ix = self._ix
        changes: dict[str, Any] = {}
        cow = self._mutation

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

        single: dict[str, tuple[Any, ...]] = {}  # one 1-tuple per document (host and VIP…)

        def sorted_objs(key: Callable[[Any], Any]) -> Callable[[Members], tuple[Any, ...]]:
            def make(members: Members) -> tuple[Any, ...]:
                if isinstance(members, str):
                    found = single.get(members)
                    if found is None:
                        found = single[members] = (self._objects[members],)
                    return found
                return tuple(sorted((self._objects[m] for m in members), key=key))

            return make

        by_name = sorted_objs(_ns_name)
        for name, group in (("workloads_by_node", "node"), ("workloads_by_identity", "identity")):
            ops, self._group_ops[group] = self._group_ops[group], {}
            if ops:
                self._regroup(cow(name), ops)
        # One (kind, namespace, name) tuple per service for both maps (a map keeps the key it
        # has when an entry is replaced), made of the service's own strings.
        service_keys: dict[str, ServiceKey] = {}
        if dirty.get("service"):
            services = cow("services")
            for key in dirty["service"]:
                obj = self._objects.get(key)
                if obj is None:
                    services.pop(_service_key(key), None)
                else:
                    assert isinstance(obj, Service)
                    shared: ServiceKey = (obj.kind, obj.namespace, obj.name)
                    service_keys[key] = shared
                    services[shared] = obj
        refresh("services_by_host", "host", self._m_host, sorted_objs(_service_rank))
        refresh("services_by_vip", "vip", self._m_vip, sorted_objs(_service_rank))
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
                obj = self._objects.get(key)
                if not isinstance(obj, Service):
                    old = endpoints.pop(_service_key(key), None)
                    if old is not None:
                        self._endpoint_total -= _endpoint_count(old)
                    continue
                svc_key = service_keys.get(key) or (obj.kind, obj.namespace, obj.name)
                old = endpoints.get(svc_key)
                if old is not None:
                    self._endpoint_total -= _endpoint_count(old)
                computed = self._compute_endpoints(obj)
                endpoints[svc_key] = computed
                self._endpoint_total += _endpoint_count(computed)
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
        mutations, self._mutations = self._mutations, {}
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

    def _workload_at(self, ip: str) -> Workload | None:
        """The workload at `ip` as this batch has it (an EndpointSlice address's owner)."""
        index = self._mutations.get("workloads_by_ip")
        found = (index if index is not None else self._ix.workloads_by_ip).get(ip)
        return found if isinstance(found, Workload) else None

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
        # The workloads' endpoint records are made on first use (endpoints.py); the others now.
        out: dict[int, tuple[Endpoint, ...]] = {}
        for port in svc.ports:
            eps = []
            for se in svc.static_endpoints:
                number = se.ports.get(port.name)
                if number is None:
                    number = port.target_port if isinstance(port.target_port, int) else port.port
                eps.append(Endpoint(se.address, number, None, se.labels, se.weight))
            if eps:
                out[port.port] = tuple(eps)
        extra = PortMap(share(tuple(out)), tuple(out.values())) if out else EMPTY
        return ServiceEndpoints(svc.ports, tuple(workloads), extra)
