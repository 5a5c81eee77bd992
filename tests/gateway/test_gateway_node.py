"""The agent-side gateway (`NodeGateway`): its own workload under the node lease, its identity,
and the Gateway listeners it serves. The end-to-end run (real CA, tunnel, outside host) is
tests/integration/test_gateway.py."""

from __future__ import annotations

import ssl

import trio

from nodeagent.gateway.node import NodeGateway, gateway_identity, gateway_workload
from nodeagent.snapshot import SnapshotSync
from nodeagent.store import codec, keys, open_store

IDENTITY = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"


class RecordingIdentities:
    """Records `ensure` calls; the tunnel never runs in this test (no backends)."""

    def __init__(self) -> None:
        self.ensured: list[str] = []

    def ensure(self, identity: str) -> None:
        self.ensured.append(identity)

    def release(self, identity: str) -> None:
        pass

    async def wait_ready(self, identity: str, within: float) -> None:
        await trio.lowlevel.checkpoint()

    def server_context(self, identity: str) -> ssl.SSLContext:
        raise AssertionError("not used")

    def client_context(self, identity: str) -> ssl.SSLContext:
        raise AssertionError("not used")

    async def wait_changed(self) -> None:
        await trio.sleep_forever()

    def peer_identity(self, cert_der: bytes) -> str:
        raise AssertionError("not used")


def test_identity_and_document() -> None:
    assert gateway_identity("cluster.local") == IDENTITY
    doc = gateway_workload("n1", {"istio": "ingressgateway"})
    assert doc["metadata"]["namespace"] == "istio-system"
    assert doc["metadata"]["labels"]["istio"] == "ingressgateway"
    assert doc["spec"] == {
        "node": "n1",
        "addresses": [],
        "serviceAccount": "istio-ingressgateway-service-account",
    }


async def test_registers_under_the_lease_and_serves_gateway_ports() -> None:
    store = await open_store("memory://")
    try:
        lease = await store.grant_lease(30)
        gateway_doc = {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "default"},
            "spec": {
                "selector": {"istio": "ingressgateway"},
                "servers": [{"port": {"number": 0, "name": "http", "protocol": "HTTP"}}],
            },
        }
        # Port 0: any free port (the listener reports what it bound).
        await store.put(keys.config("Gateway", "default", "gw"), codec.encode(gateway_doc))
        sync = SnapshotSync(store)
        identities = RecordingIdentities()
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            gw = NodeGateway(
                node="n1",
                store=store,
                lease=lambda: lease,
                identities=identities,
                sync=sync,
                bind_host="127.0.0.1",
            )
            await nursery.start(gw.run)
            kv = await store.get(keys.workload("n1", "ingressgateway-n1"))
            assert kv is not None
            assert kv.lease == lease
            assert identities.ensured == [IDENTITY]
            with trio.fail_after(5):
                while sync.current.workload("ingressgateway-n1") is None:
                    await sync.wait_swap()
            workload = sync.current.workload("ingressgateway-n1")
            assert workload is not None
            assert workload.identity == IDENTITY
            assert workload.node == "n1"
            assert set(gw.gateway.listening()) == {0}
            assert gw.statistics()["identity"] == IDENTITY
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
