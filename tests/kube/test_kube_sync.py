"""kube-sync against the API double: round trip into the store and a snapshot, 410, resume."""

from __future__ import annotations

import copy

import pytest
import structlog
import trio
from apiserver import FakeApiServer
from kube_helpers import (
    TIMEOUT,
    absent,
    body,
    fixture,
    memory_client,
    present,
    service,
    until,
    wait_key,
)

from nodeagent.agent.enroll import workload_document
from nodeagent.agent.state import PodRecord
from nodeagent.cni.metadata import StoreMetadataSource
from nodeagent.cni.protocol import CniRequest, PodRef
from nodeagent.kube.cli import KubeSync
from nodeagent.kube.client import KubeClient, KubeConfig
from nodeagent.kube.mirror import OWNER_ANNOTATION
from nodeagent.kube.reflector import Reflector
from nodeagent.kube.resources import ALL, SERVICE
from nodeagent.snapshot import SnapshotSync
from nodeagent.store import codec, keys, open_store


def _feed_bookinfo(api: FakeApiServer) -> None:
    for name in ("service", "endpointslice", "pod", "destinationrule", "virtualservice"):
        api.apply(fixture(name))


async def test_round_trip_over_tcp_into_store_and_snapshot() -> None:
    """Service + EndpointSlice + Pod + DestinationRule + VirtualService, over a real socket."""
    api = FakeApiServer()
    _feed_bookinfo(api)
    store = await open_store("memory://")
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(api.serve_tcp)
            client = KubeClient(KubeConfig(f"http://127.0.0.1:{port}"), timeout=5.0)
            sync = KubeSync(client, store, ALL)
            snapshots = SnapshotSync(store)
            with trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
                await nursery.start(snapshots.run)

            svc_kv = await store.get(keys.config("Service", "bookinfo", "reviews"))
            svc_doc = body(svc_kv)
            assert svc_doc["spec"]["clusterIP"] == "10.96.44.7"
            assert svc_doc["metadata"]["annotations"] == {OWNER_ANNOTATION: "kubernetes"}
            assert "managedFields" not in svc_doc["metadata"]
            claim = await store.get(keys.vip("10.96.44.7"))
            assert codec.decode(claim) == {"namespace": "bookinfo", "name": "reviews"}  # type: ignore[arg-type]
            slice_doc = body(await store.get(keys.endpoint_slice("bookinfo", "reviews-x7k2p")))
            assert slice_doc["service"] == "reviews"
            conditions = [
                (e["addresses"], e["ready"], e["serving"], e["terminating"])
                for e in slice_doc["endpoints"]
            ]
            assert conditions == [
                (["10.244.1.12"], True, True, False),
                (["10.244.2.7"], False, False, True),
            ]

            # The agent enrolls the pod: metadata from kube-sync's Pod, then its Workload.
            req = CniRequest(
                command="ADD",
                container_id="c1",
                netns="/run/netns/x",
                ifname="eth0",
                pod=PodRef(
                    "bookinfo", "reviews-v1-5b9c7f9d6-abcde", fixture("pod")["metadata"]["uid"]
                ),
                # As a CRI runtime names the pod (a call without them gets defaults at once).
                args={
                    "K8S_POD_NAMESPACE": "bookinfo",
                    "K8S_POD_NAME": "reviews-v1-5b9c7f9d6-abcde",
                },
            )
            meta = await StoreMetadataSource(store, wait=1.0).lookup(req)
            assert meta.service_account == "bookinfo-reviews"
            assert meta.labels["version"] == "v1"
            record = PodRecord(
                uid=req.pod.uid,
                namespace="bookinfo",
                name=req.pod.name,
                container_id="c1",
                netns="/run/netns/x",
                netns_id=(1, 2),
                addresses=("10.244.1.12",),
                service_account=meta.service_account,
                labels=dict(meta.labels),
            )
            rev = await store.put(
                keys.workload("node-1", record.uid),
                codec.encode(workload_document("node-1", record)),
            )
            with trio.fail_after(TIMEOUT):
                snap = await snapshots.wait_revision(rev)
            svc = snap.resolve_host("reviews", "bookinfo")
            assert svc is not None
            assert svc.addresses == ("10.96.44.7",)
            target = snap.find_address("10.96.44.7", 9080)
            assert target is not None
            assert [e.address for e in snap.endpoints(svc, 9080)] == ["10.244.1.12"]
            assert [e.address for e in snap.endpoints(svc, 9080, subset={"version": "v1"})] == [
                "10.244.1.12"
            ]
            routes = snap.routes_for("reviews.bookinfo.svc.cluster.local")
            assert [(vs.namespace, vs.name) for vs in routes] == [("bookinfo", "reviews")]
            assert snap.destination_rule("reviews.bookinfo.svc.cluster.local", "bookinfo")

            # A live change flows through the watch: the VirtualService is deleted.
            api.delete("VirtualService", "bookinfo", "reviews")
            with trio.fail_after(TIMEOUT):
                await wait_key(store, keys.config("VirtualService", "bookinfo", "reviews"), absent)
                snap = await snapshots.wait_revision((await store.range(keys.ROOT))[1])
            assert snap.routes_for("reviews.bookinfo.svc.cluster.local") == ()
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


@pytest.mark.parametrize("as_event", [True, False], ids=["error-event", "http-410"])
async def test_gone_relists_and_drops_what_vanished(as_event: bool, autojump_clock: object) -> None:
    api = FakeApiServer(gone_as_event=as_event)
    api.apply(service("alpha", "10.96.0.10"))
    store = await open_store("memory://")
    try:
        async with trio.open_nursery() as nursery:
            reflector = Reflector(
                memory_client(api, nursery),
                SERVICE,
                KubeSync(memory_client(api, nursery), store, ()).mirror,
            )
            with trio.fail_after(TIMEOUT):
                await nursery.start(reflector.run)
            alpha = keys.config("Service", "bookinfo", "alpha")
            beta = keys.config("Service", "bookinfo", "beta")
            assert await store.get(alpha) is not None
            with trio.fail_after(TIMEOUT):
                await until(lambda: api.active_watches != 0)
            # All at once (no checkpoint): the open watch sees no event, then its stream ends
            # and the resume point is compacted away.
            api.apply(service("beta", "10.96.0.11"))
            api.delete("Service", "bookinfo", "alpha")
            api.compact()
            api.end_watches()
            with trio.fail_after(TIMEOUT):
                await wait_key(store, beta, present)
                await wait_key(store, alpha, absent)
            assert reflector.lists == 2
            assert await store.get(keys.vip("10.96.0.10")) is None  # the VIP claim went too
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_watch_resumes_from_last_resource_version(autojump_clock: object) -> None:
    api = FakeApiServer()
    api.apply(service("alpha", "10.96.0.10"))
    store = await open_store("memory://")
    try:
        async with trio.open_nursery() as nursery:
            client = memory_client(api, nursery)
            reflector = Reflector(client, SERVICE, KubeSync(client, store, ()).mirror)
            with trio.fail_after(TIMEOUT):
                await nursery.start(reflector.run)
            beta = api.apply(service("beta", "10.96.0.11"))
            with trio.fail_after(TIMEOUT):
                await wait_key(store, keys.config("Service", "bookinfo", "beta"), present)
            assert reflector.resource_version == beta["metadata"]["resourceVersion"]

            api.end_watches()
            with trio.fail_after(TIMEOUT):
                await until(lambda: reflector.watches >= 2 and api.active_watches > 0)
            watches = [p for p in api.paths if "watch=true" in p]
            assert f"resourceVersion={beta['metadata']['resourceVersion']}" in watches[-1]
            assert "allowWatchBookmarks=true" in watches[-1]
            assert reflector.lists == 1  # resumed, not re-listed

            # A bookmark moves the resume point without an object change.
            api.rv += 5
            api.send_bookmarks()
            with trio.fail_after(TIMEOUT):
                await until(lambda: reflector.resource_version == str(api.rv))

            # Modified and deleted events after the resume are applied.
            changed = service("beta", "10.96.0.11")
            changed["spec"]["ports"] = [{"name": "grpc", "port": 9090, "protocol": "TCP"}]
            api.apply(changed)
            api.delete("Service", "bookinfo", "alpha")
            with trio.fail_after(TIMEOUT):
                await wait_key(store, keys.config("Service", "bookinfo", "alpha"), absent)
                kv = await wait_key(
                    store,
                    keys.config("Service", "bookinfo", "beta"),
                    lambda kv: kv is not None and body(kv)["spec"]["ports"][0]["port"] == 9090,
                )
            assert kv is not None
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_invalid_objects_are_rejected_by_name_and_never_stored(
    autojump_clock: object,
) -> None:
    api = FakeApiServer()
    api.apply(service("good", "10.96.0.20"))
    api.apply(service("nodeport", "10.96.0.21", type="NodePort"))
    bad_vs = copy.deepcopy(fixture("virtualservice"))
    bad_vs["metadata"]["name"] = "bad"
    bad_vs["spec"]["http"][0]["corsPolicy"] = {"allowOrigins": [{"exact": "x"}]}
    bad_vs["spec"]["http"][0]["fault"] = {"abort": {"httpStatus": 600}}
    api.apply(bad_vs)
    store = await open_store("memory://")
    try:
        async with trio.open_nursery() as nursery:
            sync = KubeSync(memory_client(api, nursery), store, ALL)
            with structlog.testing.capture_logs() as logs, trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
            rejected = [e for e in logs if e["event"] == "kube.object.rejected"]
            assert sorted((e["kind"], e["object"]) for e in rejected) == [
                ("Service", "bookinfo/nodeport"),
                ("VirtualService", "bookinfo/bad"),
            ]
            svc_errors = next(e["errors"] for e in rejected if e["kind"] == "Service")
            assert any("spec.type" in err for err in svc_errors)
            assert await store.get(keys.config("Service", "bookinfo", "good")) is not None
            assert await store.get(keys.config("Service", "bookinfo", "nodeport")) is None
            assert await store.get(keys.config("VirtualService", "bookinfo", "bad")) is None
            assert sync.mirror.statistics()["rejected"] == 2

            # A stored object that turns invalid is removed, not left at its old version.
            api.apply(service("good", "10.96.0.20", type="LoadBalancer"))
            with trio.fail_after(TIMEOUT):
                await wait_key(store, keys.config("Service", "bookinfo", "good"), absent)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_relist_keeps_documents_applied_with_meshctl(autojump_clock: object) -> None:
    """Only documents kube-sync wrote (its annotation) are deleted by a re-list."""
    api = FakeApiServer()
    store = await open_store("memory://")
    try:
        manual = keys.config("Service", "default", "manual")
        await store.put(manual, codec.encode(body_of_manual()))
        stale_pod = keys.kube_pod("bookinfo", "gone")
        await store.put(stale_pod, codec.encode({"uid": "u"}))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                await nursery.start(KubeSync(memory_client(api, nursery), store, ALL).run)
            assert await store.get(manual) is not None
            assert await store.get(stale_pod) is None
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def body_of_manual() -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "manual", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.99", "ports": [{"port": 80}]},
    }


async def test_list_is_paged_with_continue_tokens(autojump_clock: object) -> None:
    api = FakeApiServer()
    for i in range(7):
        api.apply(service(f"svc-{i}", f"10.96.1.{i + 1}"))
    store = await open_store("memory://")
    try:
        async with trio.open_nursery() as nursery:
            client = memory_client(api, nursery)
            reflector = Reflector(client, SERVICE, KubeSync(client, store, ()).mirror, page_size=3)
            items, rv = await reflector.list_all()
            assert [i["metadata"]["name"] for i in items] == [f"svc-{i}" for i in range(7)]
            assert rv == str(api.rv)
            assert all(i["kind"] == "Service" and i["apiVersion"] == "v1" for i in items)
            lists = [p for p in api.paths if "watch" not in p]
            assert len(lists) == 3
            assert "continue=" in lists[1]
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_rollouts_are_mirrored_and_validated_like_istio_kinds(autojump_clock: object) -> None:
    rollout = {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "reviews", "namespace": "bookinfo", "uid": "u-1"},
        "spec": {
            "host": "reviews",
            "virtualService": {"name": "reviews"},
            "destinationRule": {"name": "reviews"},
            "stable": "v1",
            "canary": "v2",
            "analysis": {"interval": "30s", "threshold": 3, "stepWeight": 10, "maxWeight": 50},
        },
    }
    bad = copy.deepcopy(rollout)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["analysis"]["stepWeights"] = [50, 10]
    api = FakeApiServer()
    api.apply(rollout)
    api.apply(bad)
    store = await open_store("memory://")
    try:
        async with trio.open_nursery() as nursery:
            sync = KubeSync(memory_client(api, nursery), store, ALL)
            with structlog.testing.capture_logs() as logs, trio.fail_after(TIMEOUT):
                await nursery.start(sync.run)
            doc = body(await store.get(keys.config("Rollout", "bookinfo", "reviews")))
            assert doc["spec"]["canary"] == "v2"
            assert await store.get(keys.config("Rollout", "bookinfo", "bad")) is None
            (rejected,) = [e for e in logs if e["event"] == "kube.object.rejected"]
            assert rejected["object"] == "bookinfo/bad"
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
