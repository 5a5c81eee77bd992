"""Services without a selector take their endpoints from kube-sync's EndpointSlices
(`snapshot/endpointslices.py`): conversion, kube-proxy's condition and port rules, meshed vs
outside addresses, and that one event touches only its own service."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_snapshot import Docs
from snapshot_docs import endpoint_slice, key_of, mirrored, service, snapshot_of, workload
from structlog.testing import capture_logs

from nodeagent.balance import Registry
from nodeagent.proxy.outbound import Passthrough, ToWorkload, outbound_decision
from nodeagent.snapshot import Service, Snapshot, SnapshotBuilder
from nodeagent.snapshot.convert import Context, convert
from nodeagent.snapshot.endpointslices import parse_slice_key
from nodeagent.snapshot.errors import ConvertError
from nodeagent.snapshot.model import EndpointSlice, SliceEndpoint, SlicePort
from nodeagent.store import keys

VIP = "10.96.5.5"
MESHED = "10.1.0.7"  # a registered workload
OUTSIDE = "192.0.2.40"  # no workload: outside the mesh
NOT_READY = {"ready": False, "serving": False, "terminating": False}
DRAINING = {"ready": False, "serving": True, "terminating": True}
GONE = {"ready": False, "serving": False, "terminating": True}


def external(name: str = "ext", **kw: Any) -> dict[str, Any]:
    """A selector-less Service: port 80 `http` (targetPort 9999, which slices override) and
    port 9100 `metrics`."""
    kw.setdefault(
        "ports",
        [
            {"name": "http", "port": 80, "targetPort": 9999},
            {"name": "metrics", "port": 9100, "targetPort": 9100},
        ],
    )
    return service(name, None, cluster_ip=VIP, **kw)


def backend() -> dict[str, Any]:
    return workload("w1", MESHED, {"app": "db", "version": "v1"}, sa="db", node="node-2")


def eps(snap: Snapshot, port: int = 80, name: str = "ext") -> list[tuple[str, int, str | None]]:
    svc = snap.service("default", name)
    assert svc is not None
    return [
        (e.address, e.port, e.workload.identity if e.workload else None)
        for e in snap.endpoints(svc, port)
    ]


# -- conversion ----------------------------------------------------------------------------------


def test_the_mirrored_document_converts_with_kubernetes_condition_defaults() -> None:
    key, doc = mirrored(
        endpoint_slice(
            "ext-1",
            "ext",
            [MESHED, (OUTSIDE, DRAINING)],
            ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        )
    )
    assert key == keys.endpoint_slice("default", "ext-1")
    assert parse_slice_key(key) == ("default", "ext-1")
    es = convert(key, doc, Context())
    assert es == EndpointSlice(
        namespace="default",
        name="ext-1",
        service="ext",
        ports=(SlicePort("http", 8080, "TCP"), SlicePort("dns", 53, "UDP")),
        endpoints=(
            SliceEndpoint(MESHED, ready=True, serving=True, terminating=False),
            SliceEndpoint(OUTSIDE, ready=False, serving=True, terminating=True),
        ),
    )


def test_a_document_of_an_older_kube_sync_without_serving_reads_as_kubernetes_would() -> None:
    doc = {
        "namespace": "default",
        "name": "s",
        "service": "ext",
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "any"}],  # no port: all ports
        "endpoints": [{"addresses": ["10.1.0.1"], "ready": False}, {"addresses": []}],
    }
    es = convert(keys.endpoint_slice("default", "s"), doc, Context())
    assert isinstance(es, EndpointSlice)
    assert es.ports == (SlicePort("http", 8080),)
    assert es.endpoints == (SliceEndpoint("10.1.0.1", ready=False),)


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        ({"addressType": "IPv6"}, "addressType", "'IPv6' is not supported (only IPv4)"),
        ({"addressType": "FQDN"}, "addressType", "'FQDN' is not supported (only IPv4)"),
        ({"endpoints": [{"addresses": ["fd00::1"]}]}, "endpoints[0].addresses[0]", "IPv4"),
        ({"endpoints": [{"addresses": ["10.0.0.1"], "ready": "yes"}]}, "endpoints[0].ready", ""),
        ({"ports": [{"name": "http", "port": 0}]}, "ports[0].port", "not a port number"),
        ({"ports": "http"}, "ports", "must be a list"),
        ({"endpoints": [{"addresses": ["10.0.0.1"]}] * 1001}, "endpoints", "more than 1000"),
        ({"service": 7}, "service", "not a service name"),
    ],
)
def test_a_bad_document_is_a_convert_error_naming_the_field(
    change: dict[str, Any], path: str, reason: str
) -> None:
    _, doc = mirrored(endpoint_slice("s", "ext", [MESHED]))
    doc.update(change)
    with pytest.raises(ConvertError) as info:
        convert(keys.endpoint_slice("default", "s"), doc, Context())
    assert info.value.path == path
    assert reason in str(info.value)


# -- endpoints of a selector-less Service --------------------------------------------------------


def test_meshed_addresses_are_their_workload_and_others_are_outside_the_mesh() -> None:
    snap = snapshot_of(
        [external(), backend(), mirrored(endpoint_slice("ext-1", "ext", [MESHED, OUTSIDE]))]
    )
    svc = snap.service("default", "ext")
    assert svc is not None
    meshed, outside = snap.endpoints(svc, 80)
    # the slice's port number, not the Service's targetPort
    assert (meshed.address, meshed.port, outside.address, outside.port) == (
        MESHED,
        8080,
        OUTSIDE,
        8080,
    )
    assert meshed.workload is not None
    assert meshed.workload.uid == "w1"
    assert meshed.workload.identity == "spiffe://cluster.local/ns/default/sa/db"
    assert dict(meshed.labels) == {"app": "db", "version": "v1"}  # subsets match on them
    assert outside.workload is None
    assert not outside.labels
    assert snap.endpoints(svc, 80, subset={"version": "v1"}) == (meshed,)
    assert snap.endpoints(svc, 9100) == ()  # no slice port named `metrics`
    assert snap.statistics()["endpoint_slices"] == 1
    assert snap.statistics()["endpoints"] == 2


def test_the_data_path_tunnels_to_the_meshed_one_and_passes_the_other_through() -> None:
    for address, expected in ((MESHED, ToWorkload), (OUTSIDE, Passthrough)):
        snap = snapshot_of(
            [external(), backend(), mirrored(endpoint_slice("ext-1", "ext", [address]))]
        )
        decision = outbound_decision(snap, VIP, 80, registry=Registry(on_event=None))
        assert isinstance(decision, expected), decision
        assert (decision.address, decision.port) == (address, 8080)
        if isinstance(decision, ToWorkload):
            assert decision.workload.identity == "spiffe://cluster.local/ns/default/sa/db"
        else:
            assert decision.reason == "endpoint outside the mesh"


def test_ready_endpoints_else_the_serving_terminating_ones_like_kube_proxy() -> None:
    slice_ = endpoint_slice(
        "ext-1",
        "ext",
        ["10.9.0.1", ("10.9.0.2", NOT_READY), ("10.9.0.3", DRAINING), ("10.9.0.4", GONE)],
    )
    snap = snapshot_of([external(), mirrored(slice_)])
    assert eps(snap) == [("10.9.0.1", 8080, None)]
    # no ready endpoint left: the terminating ones still serving take the traffic
    slice_["endpoints"] = slice_["endpoints"][1:]
    snap = snapshot_of([external(), mirrored(slice_)])
    assert eps(snap) == [("10.9.0.3", 8080, None)]


def test_slices_are_merged_by_name_once_per_address_and_port_ready_first() -> None:
    snap = snapshot_of(
        [
            external(),
            mirrored(endpoint_slice("ext-b", "ext", ["10.9.0.2", "10.9.0.1"])),
            mirrored(endpoint_slice("ext-a", "ext", [("10.9.0.2", NOT_READY), "10.9.0.3"])),
            mirrored(endpoint_slice("other", "not-ext", ["10.9.0.9"])),
            mirrored(endpoint_slice("nolabel", None, ["10.9.0.8"])),
            mirrored(endpoint_slice("elsewhere", "ext", ["10.9.0.7"], namespace="other")),
        ]
    )
    assert eps(snap) == [
        ("10.9.0.2", 8080, None),
        ("10.9.0.3", 8080, None),
        ("10.9.0.1", 8080, None),
    ]


def test_ports_map_by_name_and_protocol() -> None:
    ports = [
        {"name": "http", "port": 8080, "protocol": "UDP"},  # same name, other protocol
        {"name": "metrics", "port": 9102},
    ]
    snap = snapshot_of(
        [external(), mirrored(endpoint_slice("e", "ext", ["10.9.0.1"], ports=ports))]
    )
    assert eps(snap, 80) == []
    assert eps(snap, 9100) == [("10.9.0.1", 9102, None)]
    # a Service's one unnamed port takes the slice's unnamed port
    unnamed = external(ports=[{"port": 80, "targetPort": 80}])
    snap = snapshot_of(
        [unnamed, mirrored(endpoint_slice("e", "ext", ["10.9.0.1"], ports=[{"port": 7000}]))]
    )
    assert eps(snap) == [("10.9.0.1", 7000, None)]


def test_a_service_with_a_selector_ignores_its_slices() -> None:
    selected = service("ext", {"app": "db"}, cluster_ip=VIP, target=5432)
    # Kubernetes' controller writes a slice for it too, naming the same pod and an unmeshed one
    slice_ = endpoint_slice(
        "ext-1", "ext", [MESHED, OUTSIDE], ports=[{"name": "http", "port": 5432}]
    )
    snap = snapshot_of([selected, backend(), mirrored(slice_)])
    assert eps(snap) == [(MESHED, 5432, "spiffe://cluster.local/ns/default/sa/db")]


def test_an_unhealthy_meshed_address_is_no_endpoint() -> None:
    sick = backend()
    sick["status"] = {"health": "Unhealthy"}
    snap = snapshot_of([external(), sick, mirrored(endpoint_slice("e", "ext", [MESHED, OUTSIDE]))])
    assert eps(snap) == [(OUTSIDE, 8080, None)]


def test_a_headless_selectorless_service_answers_dns_with_the_slice_addresses() -> None:
    headless = service("ext", None, cluster_ip="None")
    snap = snapshot_of([headless, mirrored(endpoint_slice("e", "ext", [OUTSIDE, MESHED]))])
    svc = snap.service("default", "ext")
    assert isinstance(svc, Service)
    assert snap.dns_addresses(svc) == (OUTSIDE, MESHED)


def test_a_bad_slice_is_skipped_alone_by_name_with_a_log_line() -> None:
    d = Docs()
    good_key, good = mirrored(endpoint_slice("good", "ext", ["10.9.0.1"]))
    bad_key, bad = mirrored(endpoint_slice("bad", "ext", ["10.9.0.2"]))
    bad["addressType"] = "IPv6"
    with capture_logs() as logs:
        builder = SnapshotBuilder.build(
            [d.config(external()), d.kv(good_key, good), d.kv(bad_key, bad)], d.revision
        )
    assert eps(builder.snapshot) == [("10.9.0.1", 8080, None)]
    assert list(builder.skipped()) == [bad_key]
    assert "'IPv6' is not supported (only IPv4)" in builder.skipped()[bad_key]
    (line,) = [entry for entry in logs if entry["event"] == "snapshot.document_skipped"]
    assert (line["kind"], line["namespace"], line["name"]) == ("EndpointSlice", "default", "bad")
    assert builder.snapshot.statistics()["skipped"] == 1
    assert bad_key in builder.documents()  # the disk cache keeps it, like any


# -- incremental -----------------------------------------------------------------------------


def test_one_slice_event_touches_only_its_own_services_endpoints() -> None:
    d = Docs()
    kvs = [d.config(external(f"ext{i}")) for i in range(5)]
    kvs += [
        d.kv(*mirrored(endpoint_slice(f"s{i}", f"ext{i}", [f"10.9.0.{i + 1}"]))) for i in range(5)
    ]
    builder = SnapshotBuilder.build(kvs, d.revision)
    before = builder.snapshot.indexes
    after = builder.apply(
        [d.put(*mirrored(endpoint_slice("s2", "ext2", ["10.9.0.3", OUTSIDE])))]
    ).indexes
    for key, per_port in after.endpoints.items():
        if key[2] != "ext2":
            assert per_port is before.endpoints[key], key
    for name in ("services", "services_by_host", "services_by_vip", "workloads_by_ip", "routes"):
        assert getattr(after, name) is getattr(before, name), name
    assert [e.address for e in after.endpoints[("Service", "default", "ext2")][80]] == [
        "10.9.0.3",
        OUTSIDE,
    ]
    gone = builder.apply([d.delete(keys.endpoint_slice("default", "s2"))])
    assert eps(gone, name="ext2") == []
    assert gone.statistics()["endpoint_slices"] == 4


def test_a_workload_at_a_slice_address_turns_its_endpoint_meshed_and_back() -> None:
    d = Docs()
    builder = SnapshotBuilder.build(
        [d.config(external()), d.kv(*mirrored(endpoint_slice("e", "ext", [MESHED])))], d.revision
    )
    assert eps(builder.snapshot) == [(MESHED, 8080, None)]
    meshed = builder.apply([d.put(key_of(backend()), backend())])
    assert eps(meshed) == [(MESHED, 8080, "spiffe://cluster.local/ns/default/sa/db")]
    assert eps(builder.apply([d.delete(key_of(backend()))])) == [(MESHED, 8080, None)]
