"""Incremental updates equal a full rebuild: random batches of events over a small, colliding
universe of documents (shared IPs, overlapping selectors, wildcard hosts, EndpointSlices naming
workload and outside addresses, bad values)."""

from __future__ import annotations

import contextlib
from typing import Any

from helpers_snapshot import Docs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snapshot_docs import endpoint_slice, key_of, mirrored, service, workload

from nodeagent.snapshot import (
    DestinationRule,
    Endpoint,
    Service,
    Snapshot,
    SnapshotBuilder,
    VirtualService,
    Workload,
)
from nodeagent.snapshot.convert import Context, convert
from nodeagent.snapshot.errors import ConvertError
from nodeagent.snapshot.hosts import labels_match, wildcard_matches
from nodeagent.snapshot.model import EndpointSlice
from nodeagent.store import codec, keys
from nodeagent.store.base import Event, KeyValue

NAMESPACES = ["a", "b", "istio-system"]
LABELS = st.dictionaries(
    st.sampled_from(["app", "version"]), st.sampled_from(["x", "y"]), max_size=2
)


@st.composite
def workload_doc(draw: st.DrawFn) -> tuple[str, Any]:
    uid = draw(st.sampled_from(["w0", "w1", "w2", "w3", "w4"]))
    node = draw(st.sampled_from(["n0", "n1"]))
    ip = draw(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]))
    ports = draw(st.sampled_from([None, [{"name": "web", "containerPort": 7000}]]))
    doc = workload(
        uid,
        ip,
        draw(LABELS),
        namespace=draw(st.sampled_from(NAMESPACES)),
        node=node,
        sa=draw(st.sampled_from(["s1", "s2"])),
        ports=ports,
    )
    # sometimes more addresses, a repeated one too: each is claimed on its own
    more = draw(st.lists(st.sampled_from(["10.0.0.1", "10.0.0.3", "fd00::1"]), max_size=2))
    doc["spec"]["addresses"] += more
    return key_of(doc), doc


@st.composite
def config_doc(draw: st.DrawFn) -> tuple[str, Any]:
    ns = draw(st.sampled_from(NAMESPACES))
    name = draw(st.sampled_from(["p", "q"]))
    kind = draw(
        st.sampled_from(
            [
                "Service",
                "ServiceEntry",
                "VirtualService",
                "DestinationRule",
                "AuthorizationPolicy",
                "PeerAuthentication",
                "Gateway",
            ]
        )
    )
    host = draw(
        st.sampled_from(["p", "q.a.svc.cluster.local", "*.svc.cluster.local", "*", "ext.io"])
    )
    doc: dict[str, Any]
    if kind == "Service":
        doc = service(
            name,
            draw(st.one_of(st.none(), LABELS)),
            namespace=ns,
            cluster_ip=draw(st.sampled_from([None, "None", "10.96.0.1", "10.96.0.2"])),
            ports=[
                {"name": "http", "port": 80, "targetPort": draw(st.sampled_from([8080, "web"]))}
            ],
        )
    else:
        spec: dict[str, Any] = {}
        if kind == "ServiceEntry":
            spec = {
                "hosts": [draw(st.sampled_from(["ext.io", "*.io", "q.a.svc.cluster.local"]))],
                "addresses": draw(st.sampled_from([[], ["10.96.0.1"]])),
                "ports": [{"number": 80, "name": "http"}],
                "endpoints": [{"address": "192.0.2.1"}],
            }
            if draw(st.booleans()):
                spec["workloadSelector"] = {"labels": draw(LABELS)}
        elif kind == "VirtualService":
            spec = {
                "hosts": [host],
                "gateways": draw(st.sampled_from([[], ["mesh", "g"], ["a/g"]])),
            }
        elif kind == "DestinationRule":
            spec = {"host": host, "subsets": [{"name": "v1", "labels": draw(LABELS)}]}
        elif kind in ("AuthorizationPolicy", "PeerAuthentication"):
            if draw(st.booleans()):
                spec["selector"] = {"matchLabels": draw(LABELS)}
            if kind == "PeerAuthentication":
                spec["mtls"] = {"mode": draw(st.sampled_from(["UNSET", "STRICT", "DISABLE"]))}
            else:
                spec["action"] = draw(st.sampled_from(["ALLOW", "DENY"]))
        else:
            spec = {"selector": draw(LABELS), "servers": []}
        doc = {"kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec}
    return keys.config(kind, ns, name), doc


CONDITIONS = st.sampled_from(
    [
        {},
        {"ready": True},
        {"ready": False},  # serving (unset), not terminating: not used even as a fallback
        {"ready": False, "serving": False},
        {"ready": False, "serving": True, "terminating": True},
        {"ready": False, "serving": False, "terminating": True},
    ]
)


SLICE_PORTS = st.sampled_from(
    [
        {"name": "http", "port": 8080},
        {"name": "http", "port": 9090, "protocol": "TCP"},
        {"name": "other", "port": 8080},  # names no port of the Service
        {"name": "http", "port": 8080, "protocol": "UDP"},  # the right name, not the protocol
    ]
)


@st.composite
def slice_doc(draw: st.DrawFn) -> tuple[str, Any]:
    """An EndpointSlice as kube-sync writes it, for service p or q (or none), naming workload
    addresses and one outside the mesh; sometimes an addressType the snapshot rejects."""
    addresses = draw(
        st.lists(
            st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "192.0.2.9"]),
            min_size=1,
            max_size=3,
        )
    )
    obj = endpoint_slice(
        draw(st.sampled_from(["s0", "s1"])),
        draw(st.sampled_from(["p", "q", None])),
        [(a, draw(CONDITIONS)) for a in addresses],
        namespace=draw(st.sampled_from(NAMESPACES)),
        ports=[draw(SLICE_PORTS)],
    )
    key, doc = mirrored(obj)
    if draw(st.integers(0, 9)) == 0:
        doc["addressType"] = "IPv6"
    return key, doc


@st.composite
def selectorless_service_doc(draw: st.DrawFn) -> tuple[str, Any]:
    """A Service without a selector (its endpoints come from slices), often enough to meet one."""
    doc = service(
        draw(st.sampled_from(["p", "q"])),
        None,
        namespace=draw(st.sampled_from(NAMESPACES)),
        cluster_ip=draw(st.sampled_from([None, "None", "10.96.0.1"])),
        ports=[{"name": "http", "port": 80, "targetPort": 8080}],
    )
    return key_of(doc), doc


document = st.one_of(workload_doc(), config_doc(), slice_doc(), selectorless_service_doc())


@st.composite
def batch(draw: st.DrawFn) -> list[tuple[str, str, Any]]:
    """[(op, key, doc)]; deletes reuse keys the document strategies produce."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        key, doc = draw(document)
        op = draw(st.sampled_from(["put", "put", "put", "delete", "garbage"]))
        out.append((op, key, doc))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batch(), min_size=1, max_size=8))
def test_incremental_equals_full_rebuild(batches: list[list[tuple[str, str, Any]]]) -> None:
    d = Docs()
    incremental = SnapshotBuilder()
    current: dict[str, Any] = {}
    for ops in batches:
        events: list[Event] = []
        for op, key, doc in ops:
            if op == "delete":
                events.append(d.delete(key))
                current.pop(key, None)
            else:
                event = d.put(key, b"\xc1" if op == "garbage" else doc)
                events.append(event)
                current[key] = event.kv
        snap = incremental.apply(events)
        full = SnapshotBuilder.build(list(current.values())[::-1], d.revision).snapshot
        assert snap.indexes == full.indexes
        check_against_brute_force(snap, current)
        assert snap.revision == full.revision == d.revision
    # and a re-list (reset) onto the same documents changes nothing
    again = incremental.reset(list(current.values()), d.revision)
    assert again.indexes == snap.indexes


def slice_endpoints(
    svc: Service,
    slices: list[EndpointSlice],
    current: dict[str, KeyValue],
    workloads: list[Workload],
) -> set[tuple[str, int, str | None]]:
    """Port 80 (`http`, TCP) of a selector-less Service, from its slices, naively."""
    by_address: dict[tuple[str, int], list[Any]] = {}
    for es in slices:
        if (es.namespace, es.service) != (svc.namespace, svc.name):
            continue
        for p in es.ports:
            if p.name == "http" and p.protocol == "TCP":
                for ep in es.endpoints:
                    by_address.setdefault((ep.address, p.port), []).append(ep)
    ready = {k for k, found in by_address.items() if any(e.ready for e in found)}
    chosen = ready or {
        k for k, found in by_address.items() if any(e.serving and e.terminating for e in found)
    }
    out: set[tuple[str, int, str | None]] = set()
    for address, port in chosen:
        # the newest document among the workloads claiming the address, as the IP index has it
        owners = [w for w in workloads if w.addresses and address in w.addresses]
        owner = max(
            owners,
            key=lambda w: (current[keys.workload(w.node, w.uid)].mod_revision, w.node, w.uid),
            default=None,
        )
        if owner is None:
            out.add((address, port, None))
        elif owner.healthy:
            out.add((address, port, owner.uid))
    return out


def _triple(e: Endpoint) -> tuple[str, int, str | None]:
    return (e.address, e.port, e.workload.uid if e.workload else None)


QUERY_HOSTS = ["p.a.svc.cluster.local", "q.a.svc.cluster.local", "p.b.svc.cluster.local", "ext.io"]


def check_against_brute_force(snap: Snapshot, current: dict[str, KeyValue]) -> None:
    """An independent oracle: the lookups recomputed naively from the converted documents."""
    objs = []
    for kv in current.values():
        with contextlib.suppress(ConvertError, codec.DecodeError):
            objs.append(convert(kv.key, codec.decode(kv), Context()))
    workloads = [o for o in objs if isinstance(o, Workload)]
    slices = [o for o in objs if isinstance(o, EndpointSlice)]
    for svc in (o for o in objs if isinstance(o, Service)):
        expected = set()
        if svc.kind == "Service" and svc.selector is None:
            expected = slice_endpoints(svc, slices, current, workloads)
        elif svc.selector:
            for w in workloads:
                if w.namespace == svc.namespace and labels_match(svc.selector, w.labels):
                    tp = svc.ports[0].target_port
                    port = tp if isinstance(tp, int) else w.ports.get(tp, 80)
                    expected.add((w.address, port, w.uid))
        expected |= {(e.address, 80, None) for e in svc.static_endpoints}
        got = [_triple(e) for e in snap.endpoints(svc, 80)]
        assert len(got) == len(set(got)), svc  # never counted twice
        assert set(got) == expected, svc
    vss = [o for o in objs if isinstance(o, VirtualService)]
    drs = [o for o in objs if isinstance(o, DestinationRule)]
    for host in QUERY_HOSTS:
        for gw in ("mesh", "a/g"):
            want = {
                v.ref
                for v in vss
                if gw in v.gateways
                and any(
                    h == host or (h.startswith("*") and wildcard_matches(h, host)) for h in v.hosts
                )
            }
            assert {v.ref for v in snap.routes_for(host, gw)} == want
        exact = [r for r in drs if r.host == host]
        wild = sorted(
            (r for r in drs if r.host.startswith("*") and wildcard_matches(r.host, host)),
            key=lambda r: -len(r.host),
        )
        candidates = exact or [r for r in wild if len(r.host) == len(wild[0].host)]
        found = snap.destination_rule(host)
        assert (found.ref if found else None) in ({r.ref for r in candidates} or {None})
    for w in workloads:
        owner = snap.workload_by_ip(w.addresses[0])
        assert owner is not None
        assert w.addresses[0] in owner.addresses


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 39), st.sampled_from(["put", "delete", "relabel"]))
def test_one_workload_event_touches_only_its_own_entries(n: int, op: str) -> None:
    """Proportional to the change: every index entry the event has no business with is the very
    object the previous snapshot held (shared, not rebuilt)."""
    d = Docs()
    kvs = []
    for i in range(20):
        kvs.append(d.config(service(f"s{i}", {"app": f"s{i}"}, cluster_ip=f"10.96.0.{i + 1}")))
    for i in range(40):
        kvs.append(d.stored(workload(f"w{i}", f"10.0.0.{i + 1}", {"app": f"s{i % 20}"})))
    builder = SnapshotBuilder.build(kvs, d.revision)
    before = builder.snapshot.indexes
    doc = workload(f"w{n}", f"10.0.0.{n + 1}", {"app": f"s{n % 20}"})
    if op == "delete":
        event = d.delete(key_of(doc))
    else:
        if op == "relabel":
            doc["metadata"]["labels"] = {"app": f"s{(n + 1) % 20}"}
        else:
            doc["metadata"]["annotations"] = {"touched": "yes"}
        event = d.put(key_of(doc), doc)
    after = builder.apply([event]).indexes
    selecting = {f"s{n % 20}", f"s{(n + 1) % 20}"} if op == "relabel" else {f"s{n % 20}"}
    for key, endpoints in after.endpoints.items():
        if key[2] not in selecting:
            assert endpoints is before.endpoints[key], key
    for uid, wl in after.workloads_by_uid.items():
        if uid != f"w{n}":
            assert wl is before.workloads_by_uid[uid]
    for name in ("services", "services_by_host", "services_by_vip", "routes"):
        assert getattr(after, name) is getattr(before, name), name
