"""Indexing, resolution and precedence of the snapshot, over hand-made and corpus documents."""

from __future__ import annotations

from typing import Any

import pytest
from corpus import corpus_docs
from helpers_snapshot import Docs
from snapshot_docs import key_of, service, workload

from nodeagent.snapshot import ServiceTarget, Snapshot, SnapshotBuilder, Workload
from nodeagent.store import keys
from nodeagent.store.base import KeyValue


def build(kvs: list[KeyValue], **params: str) -> Snapshot:
    return SnapshotBuilder.build(
        kvs, max((kv.mod_revision for kv in kvs), default=0), **params
    ).snapshot


@pytest.fixture
def mesh() -> Snapshot:
    d = Docs()
    kvs = [
        d.stored(workload("r1", "10.1.0.1", {"app": "reviews", "version": "v1"}, sa="reviews")),
        d.stored(
            workload(
                "r2",
                "10.1.0.2",
                {"app": "reviews", "version": "v2"},
                sa="reviews",
                node="node-2",
                ports=[{"name": "http-alt", "containerPort": 9081}],
            )
        ),
        d.stored(workload("p1", "10.1.0.3", {"app": "ratings"}, namespace="other", sa="ratings")),
        d.config(
            service(
                "reviews",
                {"app": "reviews"},
                cluster_ip="10.96.0.10",
                ports=[
                    {"name": "http", "port": 9080, "targetPort": 9080},
                    {"name": "http-alt", "port": 9090, "targetPort": "http-alt"},
                ],
            )
        ),
        d.config(service("ratings", {"app": "ratings"}, namespace="other", cluster_ip="None")),
        d.config(service("nothing", None, cluster_ip="10.96.0.11")),
    ]
    return build(kvs, trust_domain="example.org")


def test_workload_indexes(mesh: Snapshot) -> None:
    r1 = mesh.workload("r1")
    assert r1 is not None
    assert r1.identity == "spiffe://example.org/ns/default/sa/reviews"
    assert mesh.workload_by_ip("10.1.0.1") is r1
    assert mesh.find_address("10.1.0.1", 12345) is r1
    assert [w.uid for w in mesh.workloads_on_node("node-1")] == ["p1", "r1"]
    assert [w.uid for w in mesh.workloads_with_identity(r1.identity)] == ["r1", "r2"]
    assert mesh.workload("nope") is None
    assert mesh.find_address("10.9.9.9", 80) is None


def test_service_by_vip_and_port(mesh: Snapshot) -> None:
    target = mesh.find_address("10.96.0.10", 9090)
    assert isinstance(target, ServiceTarget)
    assert target.service.name == "reviews"
    assert target.port.name == "http-alt"
    # a VIP with an undeclared port reaches nothing, as with kube-proxy
    assert mesh.find_address("10.96.0.10", 1234) is None


@pytest.mark.parametrize(
    ("name", "from_ns", "expected"),
    [
        ("reviews", "default", "default/reviews"),
        ("reviews.default", "other", "default/reviews"),
        ("reviews.default.svc", "other", "default/reviews"),
        ("reviews.default.svc.cluster.local", "other", "default/reviews"),
        ("Reviews.Default.svc.cluster.local.", "other", "default/reviews"),
        ("ratings", "other", "other/ratings"),
        ("ratings", "default", None),
        ("reviews.other", "default", None),
    ],
)
def test_resolve_host(mesh: Snapshot, name: str, from_ns: str, expected: str | None) -> None:
    found = mesh.resolve_host(name, from_ns)
    assert (found.ref if found else None) == expected


def test_endpoints_resolve_target_ports(mesh: Snapshot) -> None:
    svc = mesh.service("default", "reviews")
    assert svc is not None
    numeric = mesh.endpoints(svc, 9080)
    assert [(e.address, e.port) for e in numeric] == [("10.1.0.1", 9080), ("10.1.0.2", 9080)]
    # named targetPort: r2 declares it; r1 does not, so the service port number is used
    named = mesh.endpoints(svc, svc.port(9090))  # type: ignore[arg-type]
    assert [(e.address, e.port) for e in named] == [("10.1.0.1", 9090), ("10.1.0.2", 9081)]
    v2 = mesh.endpoints(svc, 9080, subset={"version": "v2"})
    assert [e.workload.uid for e in v2 if e.workload] == ["r2"]
    assert mesh.endpoints(svc, 1) == ()


def test_headless_and_selectorless(mesh: Snapshot) -> None:
    ratings = mesh.service("other", "ratings")
    assert ratings is not None
    assert ratings.headless
    assert ratings.addresses == ()
    assert mesh.dns_addresses(ratings) == ("10.1.0.3",)
    nothing = mesh.service("default", "nothing")
    assert nothing is not None
    assert mesh.endpoints(nothing, 80) == ()
    assert mesh.dns_addresses(nothing) == ("10.96.0.11",)


def test_service_entry_hosts_addresses_endpoints() -> None:
    d = Docs()
    docs = corpus_docs("istio/validation/serviceentry-valid.yaml")
    # YAML reads the corpus' unquoted `001:db8::` as a map; the config API stores strings
    docs[0]["spec"]["addresses"] = ["1.2.3.4", "2001:0db8::"]
    kvs = [d.config(doc) for doc in docs]
    static = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "db", "namespace": "data"},
        "spec": {
            "hosts": ["db.internal", "*.db.internal"],
            "addresses": ["192.0.2.10"],
            "ports": [{"number": 5432, "name": "tcp-pg", "protocol": "TCP"}],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "endpoints": [
                {"address": "192.0.2.21", "ports": {"tcp-pg": 6432}},
                {"address": "192.0.2.22", "labels": {"zone": "b"}},
            ],
        },
    }
    kvs.append(d.config(static))
    snap = build(kvs)
    assert snap.statistics()["skipped"] == 0
    db = snap.resolve_host("db.internal", "anywhere")
    assert db is not None
    assert db.kind == "ServiceEntry"
    assert snap.service_by_host("replica-1.db.internal") is db
    target = snap.find_address("192.0.2.10", 5432)
    assert isinstance(target, ServiceTarget)
    assert target.service is db
    assert [(e.address, e.port) for e in snap.endpoints(db, 5432)] == [
        ("192.0.2.21", 6432),
        ("192.0.2.22", 5432),
    ]
    full = snap.service("default", "full", kind="ServiceEntry")
    assert full is not None
    assert full.addresses == ("1.2.3.4", "2001:db8::")  # canonical text form
    assert full.ports[0].target_port == 2345
    assert full.ports[0].protocol_hint == "http"
    # a CIDR address of one host is indexed; the other addresses are not VIPs
    assert snap.service("default", "none-cidr", kind="ServiceEntry").addresses == ("1.1.1.1",)  # type: ignore[union-attr]


def test_kubernetes_service_wins_a_shared_host() -> None:
    d = Docs()
    se = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "shadow", "namespace": "aaa"},
        "spec": {
            "hosts": ["web.default.svc.cluster.local"],
            "ports": [{"number": 80, "name": "http"}],
        },
    }
    snap = build([d.config(se), d.config(service("web", {"app": "web"}))])
    found = snap.resolve_host("web", "default")
    assert found is not None
    assert found.kind == "Service"


def bookinfo() -> Snapshot:
    d = Docs()
    kvs = [
        d.config(doc)
        for doc in corpus_docs(
            "istio/bookinfo-networking/bookinfo-gateway.yaml",
            "istio/bookinfo-networking/destination-rule-all.yaml",
            "istio/bookinfo-networking/virtual-service-reviews-jason-v2-v3.yaml",
            "istio/bookinfo-networking/egress-rule-google-apis.yaml",
        )
    ]
    wild = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "all-default", "namespace": "default"},
        "spec": {"hosts": ["*.default.svc.cluster.local"], "http": [{"route": []}]},
    }
    both = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "both", "namespace": "web"},
        "spec": {
            "hosts": ["reviews.default.svc.cluster.local"],
            "gateways": ["mesh", "default/bookinfo-gateway"],
        },
    }
    kvs += [d.config(wild), d.config(both)]
    kvs += [d.config(service(n, {"app": n})) for n in ("reviews", "productpage")]
    return build(kvs)


def test_routes_for_qualifies_short_names_and_orders_wildcards_last() -> None:
    snap = bookinfo()
    reviews = "reviews.default.svc.cluster.local"
    assert [vs.ref for vs in snap.routes_for(reviews)] == [
        "default/reviews",
        "web/both",
        "default/all-default",
    ]
    assert [vs.ref for vs in snap.routes_for("details.default.svc.cluster.local")] == [
        "default/all-default"
    ]
    assert snap.routes_for("reviews") == ()  # callers pass FQDNs
    assert [vs.ref for vs in snap.routes_for("www.googleapis.com")] == [
        "default/rewrite-port-for-googleapis"
    ]


def test_gateway_binding() -> None:
    snap = bookinfo()
    gw = "default/bookinfo-gateway"
    assert [vs.ref for vs in snap.virtual_services_for_gateway(gw)] == [
        "default/bookinfo",
        "web/both",
    ]
    # "*" on the gateway matches any Host; the mesh-only VS does not apply there
    assert [vs.ref for vs in snap.routes_for("bookinfo.example.com", gw)] == ["default/bookinfo"]
    assert [vs.ref for vs in snap.routes_for("reviews.default.svc.cluster.local", gw)] == [
        "web/both",
        "default/bookinfo",
    ]
    assert snap.gateway(gw) is not None
    assert snap.virtual_services_for_gateway("default/none") == ()


def test_seed_canary_binds_to_its_namespace_gateway() -> None:
    d = Docs()
    snap = build([d.config(doc) for doc in corpus_docs("seed/01-canary.yaml")])
    (vs,) = snap.virtual_services_for_gateway("default/http-gateway")
    assert vs.gateways == ("default/http-gateway",)
    assert vs.http[0].destinations[0].weight == 90
    dr = snap.destination_rule("my-app.default.svc.cluster.local")
    assert dr is not None
    assert dr.subset("v2").labels == {"version": "v2.0.0"}  # type: ignore[union-attr]


def test_destination_rule_lookup() -> None:
    snap = bookinfo()
    dr = snap.destination_rule("reviews.default.svc.cluster.local")
    assert dr is not None
    assert sorted(dr.subsets) == ["v1", "v2", "v3"]
    assert dr.traffic_policy is None
    google = snap.destination_rule("www.googleapis.com")
    assert google is not None
    assert google.traffic_policy["loadBalancer"]["simple"] == "ROUND_ROBIN"  # type: ignore[index]
    assert snap.destination_rule("nope.default.svc.cluster.local") is None


def test_destination_rule_namespace_preference() -> None:
    d = Docs()

    def dr(ns: str, host: str) -> dict[str, Any]:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "r", "namespace": ns},
            "spec": {"host": host},
        }

    host = "web.shop.svc.cluster.local"
    kvs = [
        d.config(dr("aaa", host)),
        d.config(dr("client", host)),
        d.config(dr("shop", "web")),
        d.config(dr("istio-system", host)),
        d.config(dr("zzz", "*.svc.cluster.local")),
        d.config(service("web", {"app": "web"}, namespace="shop")),
    ]
    snap = build(kvs)
    assert snap.destination_rule(host, "client").namespace == "client"  # type: ignore[union-attr]
    assert snap.destination_rule(host, "elsewhere").namespace == "shop"  # type: ignore[union-attr]
    assert snap.destination_rule("x.y.svc.cluster.local").namespace == "zzz"  # type: ignore[union-attr]


def policy(kind: str, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def test_authorization_policies_for() -> None:
    d = Docs()
    kvs = [
        d.stored(workload("a", "10.0.0.1", {"app": "httpbin"}, namespace="foo")),
        d.stored(workload("b", "10.0.0.2", {"app": "other"}, namespace="foo")),
        d.config(
            policy(
                "AuthorizationPolicy",
                "istio-system",
                "mesh-deny",
                {"action": "DENY", "rules": [{}]},
            )
        ),
        d.config(
            policy(
                "AuthorizationPolicy",
                "istio-system",
                "root-sel",
                {"selector": {"matchLabels": {"app": "httpbin"}}, "action": "AUDIT", "rules": [{}]},
            )
        ),
        d.config(
            policy(
                "AuthorizationPolicy",
                "foo",
                "ns-allow",
                {"rules": [{"from": [{"source": {"namespaces": ["foo"]}}]}]},
            )
        ),
        d.config(policy("AuthorizationPolicy", "bar", "elsewhere", {})),
    ]
    kvs += [
        d.config(doc, namespace="foo") for doc in corpus_docs("istio/validation/authz-valid.yaml")
    ]
    snap = build(kvs)
    a, b = snap.workload("a"), snap.workload("b")
    assert a is not None
    assert b is not None
    pa = snap.authorization_policies_for(a)
    names = {kind: [p.ref for p in getattr(pa, kind)] for kind in ("allow", "deny", "audit")}
    assert names["deny"] == ["istio-system/mesh-deny"]
    assert names["audit"] == ["istio-system/root-sel"]
    assert "foo/ns-allow" in names["allow"]
    assert "foo/full" in names["allow"]  # selects app: httpbin
    pb = snap.authorization_policies_for(b)
    assert [p.ref for p in pb.audit] == []
    assert "foo/full" not in [p.ref for p in pb.allow]
    assert "bar/elsewhere" not in [p.ref for p in pb.allow]


@pytest.mark.parametrize(
    ("policies", "labels", "port", "expected"),
    [
        ([], {}, 80, "PERMISSIVE"),
        ([("istio-system", "mesh", None, "STRICT", {})], {}, 80, "STRICT"),
        (
            [("istio-system", "mesh", None, "STRICT", {}), ("ns", "d", None, "DISABLE", {})],
            {},
            80,
            "DISABLE",
        ),
        # UNSET at the namespace level inherits the mesh's mode
        (
            [("istio-system", "mesh", None, "STRICT", {}), ("ns", "d", None, "UNSET", {})],
            {},
            80,
            "STRICT",
        ),
        # workload selector beats namespace
        (
            [("ns", "d", None, "STRICT", {}), ("ns", "w", {"app": "x"}, "PERMISSIVE", {})],
            {"app": "x"},
            80,
            "PERMISSIVE",
        ),
        (
            [("ns", "d", None, "STRICT", {}), ("ns", "w", {"app": "x"}, "PERMISSIVE", {})],
            {"app": "y"},
            80,
            "STRICT",
        ),
        # port-level overrides; UNSET at port level inherits the workload's effective mode
        (
            [("ns", "w", {"app": "x"}, "PERMISSIVE", {"8080": "STRICT", "9090": "UNSET"})],
            {"app": "x"},
            8080,
            "STRICT",
        ),
        (
            [
                ("ns", "d", None, "DISABLE", {}),
                ("ns", "w", {"app": "x"}, "UNSET", {"9090": "UNSET"}),
            ],
            {"app": "x"},
            9090,
            "DISABLE",
        ),
        (
            [("ns", "w", {"app": "x"}, "PERMISSIVE", {"8080": "STRICT"})],
            {"app": "x"},
            80,
            "PERMISSIVE",
        ),
        # a root-namespace policy with a selector is not mesh-wide
        ([("istio-system", "sel", {"app": "x"}, "STRICT", {})], {"app": "x"}, 80, "PERMISSIVE"),
        # the empty selector `{}` is a workload-level policy matching every workload
        (
            [("ns", "d", None, "STRICT", {}), ("ns", "all", {}, "DISABLE", {})],
            {"app": "z"},
            80,
            "DISABLE",
        ),
        # two at one level: the lowest name wins (Istio: the oldest)
        ([("ns", "b", None, "DISABLE", {}), ("ns", "a", None, "STRICT", {})], {}, 80, "STRICT"),
    ],
)
def test_peer_authentication_precedence(
    policies: list[tuple[str, str, dict[str, str] | None, str, dict[str, str]]],
    labels: dict[str, str],
    port: int,
    expected: str,
) -> None:
    d = Docs()
    kvs = [d.stored(workload("w", "10.0.0.1", labels, namespace="ns"))]
    for ns, name, selector, mode, ports in policies:
        spec: dict[str, Any] = {"mtls": {"mode": mode}}
        if selector is not None:
            spec["selector"] = {"matchLabels": selector}
        if ports:
            spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
        kvs.append(d.config(policy("PeerAuthentication", ns, name, spec)))
    snap = build(kvs)
    wl = snap.workload("w")
    assert wl is not None
    assert snap.peer_authentication_for(wl, port) == expected


def test_bad_documents_are_skipped_not_fatal() -> None:
    d = Docs()
    kvs = [
        d.stored(workload("ok", "10.0.0.1", {"app": "a"})),
        d.kv(keys.workload("node-1", "garbage"), b"\xc1\xc1 not msgpack"),
        d.kv(keys.workload("node-1", "badip"), workload("badip", "999.1.1.1", {})),
        d.kv(keys.config("Service", "default", "s"), {"spec": {"ports": [{"port": 70000}]}}),
        d.kv(keys.config("VirtualService", "default", "v"), ["not", "a", "map"]),
        d.kv(
            keys.config("PeerAuthentication", "default", "p"),
            policy("PeerAuthentication", "default", "p", {"mtls": {"mode": "LOOSE"}}),
        ),
        d.kv(keys.config("UnknownKind", "default", "x"), {"spec": {}}),
        d.kv(keys.CA_BUNDLE, b"\x00"),
    ]
    builder = SnapshotBuilder.build(kvs, d.revision)
    snap = builder.snapshot
    assert snap.workload("ok") is not None
    assert snap.statistics()["skipped"] == 5
    skipped = builder.skipped()
    assert "does not decode" in skipped[keys.workload("node-1", "garbage")]
    assert "spec.addresses[0]" in skipped[keys.workload("node-1", "badip")]
    assert "spec.ports[0].port" in skipped[keys.config("Service", "default", "s")]
    assert "LOOSE" in skipped[keys.config("PeerAuthentication", "default", "p")]
    assert snap.revision == d.revision


def test_updates_make_a_new_snapshot_and_leave_the_old_one_alone() -> None:
    d = Docs()
    doc = workload("w1", "10.0.0.1", {"app": "a", "version": "v1"})
    key = key_of(doc)
    builder = SnapshotBuilder.build(
        [d.kv(key, doc), d.config(service("a", {"app": "a"}, cluster_ip="10.96.0.1"))], d.revision
    )
    before = builder.snapshot
    svc = before.service("default", "a")
    assert svc is not None
    assert len(before.endpoints(svc, 80)) == 1

    doc["metadata"]["labels"] = {"app": "b"}
    after = builder.apply([d.put(key, doc)])
    assert after is not before
    assert after.revision == d.revision
    assert after.endpoints(svc, 80) == ()
    assert len(before.endpoints(svc, 80)) == 1  # the old snapshot is untouched
    wl = after.workload("w1")
    assert isinstance(wl, Workload)
    assert wl.labels == {"app": "b"}
    # indexes the change did not touch are shared, not copied
    assert after.indexes.routes is before.indexes.routes
    assert after.indexes.services is before.indexes.services

    gone = builder.apply([d.delete(key)])
    assert gone.workload("w1") is None
    assert gone.find_address("10.0.0.1", 80) is None
    assert gone.statistics()["workloads"] == 0


def test_most_recent_writer_owns_a_shared_ip() -> None:
    d = Docs()
    old = d.stored(workload("old", "10.0.0.1", {}))
    new = d.stored(workload("new", "10.0.0.1", {}, node="node-2"))
    builder = SnapshotBuilder.build([new, old], d.revision)
    assert builder.snapshot.workload_by_ip("10.0.0.1").uid == "new"  # type: ignore[union-attr]
    snap = builder.apply([d.delete(new.key)])
    assert snap.workload_by_ip("10.0.0.1").uid == "old"  # type: ignore[union-attr]
