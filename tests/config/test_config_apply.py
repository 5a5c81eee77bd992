"""Applying batches to a real (memory and sqlite) store: one transaction, VIP allocation."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from nodeagent.config.apply import (
    ConflictError,
    Target,
    apply_documents,
    delete_documents,
    find,
)
from nodeagent.config.batch import Document, validate_batch
from nodeagent.config.documents import load_text
from nodeagent.config.errors import ConfigInvalid
from nodeagent.config.kinds import KINDS
from nodeagent.store import Compare, Op, Put, Store, TxnResult, keys, open_store
from nodeagent.store.codec import decode, encode
from nodeagent.store.forwarding import ForwardingStore


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    s = await open_store("memory://")
    try:
        yield s
    finally:
        await s.aclose()


def docs(text: str, namespace: str = "default") -> list[Document]:
    parsed, errors = validate_batch(load_text(text, "t.yaml"), namespace)
    assert errors == [], [str(e) for e in errors]
    return parsed


def svc(name: str, extra: str = "") -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec: {{ports: [{{port: 80}}]{extra}}}\n---\n"
    )


async def vip_of(store: Store, name: str, namespace: str = "default") -> Any:
    kv = await store.get(keys.config("Service", namespace, name))
    assert kv is not None
    return decode(kv)["spec"].get("clusterIP")


async def test_services_get_distinct_vips_claimed_in_the_same_revision(store: Store) -> None:
    result = await apply_documents(store, docs(svc("a") + svc("b")))
    assert [o.action for o in result.outcomes] == ["created", "created"]
    # .1 stays free: it is the Kubernetes API service's address
    assert await vip_of(store, "a") == "10.96.0.2"
    assert await vip_of(store, "b") == "10.96.0.3"
    claim = await store.get(keys.vip("10.96.0.2"))
    assert claim is not None
    assert decode(claim) == {"namespace": "default", "name": "a"}
    assert claim.mod_revision == result.revision


async def test_reapply_keeps_the_vip_and_reports_unchanged(store: Store) -> None:
    await apply_documents(store, docs(svc("a")))
    result = await apply_documents(store, docs(svc("a")))
    assert [o.action for o in result.outcomes] == ["unchanged"]
    await apply_documents(store, docs(svc("a", ", selector: {app: a}")))
    assert await vip_of(store, "a") == "10.96.0.2"
    # the VIP is immutable, as in Kubernetes
    with pytest.raises(ConfigInvalid, match=r"spec\.clusterIP: field is immutable"):
        await apply_documents(store, docs(svc("a", ", clusterIP: 10.96.9.9")))


async def test_explicit_headless_and_configured_range(store: Store) -> None:
    batch = docs(svc("x", ", clusterIP: 10.96.0.1") + svc("y") + svc("h", ", clusterIP: None"))
    await apply_documents(store, batch, vip_range=ipaddress.IPv4Network("10.96.0.0/30"))
    assert await vip_of(store, "x") == "10.96.0.1"
    assert await vip_of(store, "y") == "10.96.0.2"  # never the address x claims
    assert await vip_of(store, "h") == "None"
    claims, _ = await store.range(keys.VIPS)
    assert [kv.key for kv in claims] == [keys.vip("10.96.0.1"), keys.vip("10.96.0.2")]
    with pytest.raises(ConfigInvalid, match=re.escape("no free VIP left in 10.96.0.0/30")):
        await apply_documents(
            store, docs(svc("z")), vip_range=ipaddress.IPv4Network("10.96.0.0/30")
        )
    with pytest.raises(
        ConfigInvalid, match=re.escape("10.96.0.2 is already allocated to Service default/y")
    ):
        await apply_documents(store, docs(svc("w", ", clusterIP: 10.96.0.2")))


async def test_a_bad_document_writes_nothing(store: Store) -> None:
    before = (await store.range(keys.ROOT))[1]
    vs = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\n"
        "spec: {host: r, subsets: [{name: v1}]}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
        "spec: {hosts: [r], http: [{route: [{destination: {host: r, subset: v2}}]}]}\n"
    )
    with pytest.raises(ConfigInvalid) as info:
        await apply_documents(store, docs(svc("a") + vs))
    assert 'subset "v2" is not defined' in str(info.value)
    kvs, revision = await store.range(keys.ROOT)
    assert kvs == []
    assert revision == before


async def test_subsets_are_checked_against_the_store(store: Store) -> None:
    await apply_documents(
        store,
        docs(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            "metadata: {name: r, namespace: prod}\nspec: {host: r.prod.svc.cluster.local,"
            " subsets: [{name: v1}]}\n"
        ),
    )
    vs = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
        "spec: {hosts: [r], http: [{route: [{destination: {host: r, subset: %s}}]}]}\n"
    )
    await apply_documents(store, docs(vs % "v1", namespace="prod"))
    with pytest.raises(ConfigInvalid, match="DestinationRule prod/r"):
        await apply_documents(store, docs(vs % "v2", namespace="prod"))
    # another namespace's short name is another host: not checkable, accepted
    await apply_documents(store, docs(vs % "v2", namespace="dev"))


async def test_delete_frees_the_vip(store: Store) -> None:
    await apply_documents(store, docs(svc("a")))
    deleted, _ = await delete_documents(store, [Target(KINDS["Service"], "default", "a")])
    assert deleted == ["Service default/a"]
    assert await store.get(keys.vip("10.96.0.2")) is None
    await apply_documents(store, docs(svc("b")))
    assert await vip_of(store, "b") == "10.96.0.2"
    with pytest.raises(LookupError, match="Service default/a not found"):
        await delete_documents(store, [Target(KINDS["Service"], "default", "a")])


async def test_workloads_live_under_their_node(store: Store) -> None:
    wl = (
        "apiVersion: mesh.nodeagent.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: web-1, namespace: prod, uid: u1, labels: {app: web}}\n"
        "spec: {node: node-1, addresses: [10.1.0.5], serviceAccount: web}\n"
    )
    await apply_documents(store, docs(wl))
    kv = await store.get(keys.workload("node-1", "u1"))
    assert kv is not None
    assert decode(kv)["spec"] == {
        "node": "node-1",
        "addresses": ["10.1.0.5"],
        "serviceAccount": "web",
    }
    found = await find(store, KINDS["Workload"], "prod", "web-1")
    assert [k.key for k, _ in found] == [keys.workload("node-1", "u1")]
    await delete_documents(store, [Target(KINDS["Workload"], "prod", "web-1")])
    assert await store.get(keys.workload("node-1", "u1")) is None


class _Racer(ForwardingStore):
    """A real store whose first transactions lose a race: just before each, another writer
    claims the VIP this apply is about to take."""

    def __init__(self, inner: Store, races: int) -> None:
        super().__init__(inner)
        self.races = races

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        if self.races > 0:
            self.races -= 1
            for op in success:
                if isinstance(op, Put) and op.key.startswith(keys.VIPS):
                    await self.inner.put(op.key, encode({"namespace": "x", "name": "rival"}))
        return await self.inner.txn(compares, success, failure)


async def test_a_lost_vip_race_retries_with_another_address(store: Store) -> None:
    racer = _Racer(store, races=2)
    await apply_documents(racer, docs(svc("a")))
    assert await vip_of(store, "a") == "10.96.0.4"
    with pytest.raises(ConflictError, match="nothing was written"):
        await apply_documents(_Racer(store, races=10), docs(svc("b")), max_attempts=3)
    assert await store.get(keys.config("Service", "default", "b")) is None


async def test_concurrent_applies_never_share_a_vip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/mesh.db"
    names = [f"s{i}" for i in range(8)]

    async def one(name: str) -> None:
        s = await open_store(url)
        try:
            await apply_documents(s, docs(svc(name)))
        finally:
            await s.aclose()

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    s = await open_store(url)
    try:
        vips = [await vip_of(s, n) for n in names]
        claims, _ = await s.range(keys.VIPS)
    finally:
        await s.aclose()
    assert len(set(vips)) == len(names)
    assert sorted(kv.key for kv in claims) == sorted(keys.vip(v) for v in vips)
