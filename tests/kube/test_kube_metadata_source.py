"""StoreMetadataSource: pod labels and service account from kube-sync's Pods, bounded wait."""

from __future__ import annotations

import pytest
import trio
from kube_helpers import fixture

from nodeagent.cni.errors import EnrollError, ErrorCode
from nodeagent.cni.metadata import (
    RuntimeArgsMetadataSource,
    StoreMetadataSource,
    metadata_source,
)
from nodeagent.cni.protocol import CniRequest, PodRef
from nodeagent.kube.mirror import convert
from nodeagent.kube.resources import POD
from nodeagent.store import codec, open_store
from nodeagent.store.base import Store


def _req(
    ns: str = "bookinfo", name: str = "reviews-v1-5b9c7f9d6-abcde", uid: str = ""
) -> CniRequest:
    return CniRequest(
        command="ADD",
        container_id="c",
        netns="/run/netns/p",
        ifname="eth0",
        pod=PodRef(ns, name, uid or fixture("pod")["metadata"]["uid"]),
        args={"K8S_POD_NAMESPACE": ns, "K8S_POD_NAME": name},
    )


async def _put_pod(store: Store, **changes: object) -> None:
    pod = fixture("pod")
    pod["metadata"].update(changes)
    m = convert(POD, pod)
    await store.put(m.key, codec.encode(m.body))


async def test_reads_mirrored_pod() -> None:
    store = await open_store("memory://")
    try:
        await _put_pod(store)
        meta = await StoreMetadataSource(store, wait=1).lookup(_req())
        assert meta.service_account == "bookinfo-reviews"
        assert dict(meta.labels) == {
            "app": "reviews",
            "pod-template-hash": "5b9c7f9d6",
            "version": "v1",
        }
    finally:
        await store.aclose()


async def test_waits_for_kube_sync_then_answers(autojump_clock: object) -> None:
    store = await open_store("memory://")
    try:
        got: list[str] = []

        async def lookup() -> None:
            meta = await StoreMetadataSource(store, wait=10).lookup(_req())
            got.append(meta.service_account)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup)
            await trio.sleep(3)
            assert got == []
            # An older pod of the same name (another uid) is waited past.
            await _put_pod(store, uid="old-uid")
            await trio.sleep(1)
            assert got == []
            await _put_pod(store)
        assert got == ["bookinfo-reviews"]
    finally:
        await store.aclose()


async def test_bounded_wait_names_the_pod(autojump_clock: object) -> None:
    store = await open_store("memory://")
    try:
        start = trio.current_time()
        with pytest.raises(EnrollError) as info:
            await StoreMetadataSource(store, wait=5).lookup(_req(name="missing"))
        assert trio.current_time() - start == pytest.approx(5)
        assert info.value.code == ErrorCode.TRY_AGAIN_LATER
        assert "bookinfo/missing" in info.value.msg
        assert "not in the store after 5s" in info.value.msg
    finally:
        await store.aclose()


def test_source_by_name() -> None:
    assert isinstance(metadata_source("runtime-args"), RuntimeArgsMetadataSource)
    with pytest.raises(ValueError, match="needs the store"):
        metadata_source("kubernetes")
    with pytest.raises(ValueError, match="expected 'runtime-args' or 'kubernetes'"):
        metadata_source("api")


async def test_pod_the_runtime_did_not_name_gets_defaults_at_once(autojump_clock: object) -> None:
    """mesh-cni's `unnamedPods` (e.g. `ctr run --cni`): no K8S_POD_* in CNI_ARGS, so no Pod for
    kube-sync to mirror; the lookup does not wait for one."""
    store = await open_store("memory://")
    try:
        req = CniRequest(
            command="ADD",
            container_id="mesh-web",
            netns="/proc/42/ns/net",
            ifname="eth0",
            pod=PodRef("default", "mesh-web", "mesh-web"),
            args={},
        )
        start = trio.current_time()
        meta = await StoreMetadataSource(store, wait=5).lookup(req)
        assert trio.current_time() == start
        assert (dict(meta.labels), meta.service_account) == ({}, "default")
    finally:
        await store.aclose()
