"""Identity end to end on a 2-node sandbox: the real CA process, real agents, the sqlite store.

Agents obtain SPIFFE certificates for the service accounts of the pods they enroll (seen on the
admin socket's /certs), and node authorization holds: a CSR a node files for a service account
that has no workload on it is rejected with the reason.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from cryptography import x509
from mesh_helpers import admin, sandbox_fixture

from nodeagent.ca import certs
from nodeagent.sandbox import Sandbox
from nodeagent.store import codec, keys, open_store

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("id")
TD = "cluster.local"


def wait_cert(sb: Sandbox, node: str, identity: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["identity"]: r for r in admin(sb, node, "/certs")}
        row = rows.get(identity)
        if row is not None and row["state"] == "valid":
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"{identity} has no valid certificate on {node}: {rows}")
        time.sleep(0.2)


async def _read(url: str, *names: str) -> dict[str, Any]:
    store = await open_store(url)
    try:
        out = {}
        for name in names:
            kv = await store.get(name)
            out[name] = None if kv is None else codec.decode(kv)
        return out
    finally:
        await store.aclose()


def test_agents_obtain_certificates_for_their_pods(sandbox: Sandbox) -> None:
    sandbox.pod_add("n1", "default", "web", service_account="web")
    sandbox.pod_add("n2", "default", "db", service_account="db")
    web, db = f"spiffe://{TD}/ns/default/sa/web", f"spiffe://{TD}/ns/default/sa/db"
    row = wait_cert(sandbox, "n1", web)
    assert wait_cert(sandbox, "n2", db)["serial"]
    assert db not in {r["identity"] for r in admin(sandbox, "n1", "/certs")}
    assert not any("key" in k for k in row)
    dump = admin(sandbox, "n1", "/config_dump")
    assert [c["serial"] for c in dump["certificates"]] == [row["serial"]]
    assert dump["identity"]["roots"] == 1

    # the chain in the store is the one on /certs, and verifies against the published bundle
    docs = trio.run(_read, sandbox.store_url, keys.cert("n1", "default/web"), keys.CA_BUNDLE)
    answer, bundle = docs[keys.cert("n1", "default/web")], docs[keys.CA_BUNDLE]
    assert answer["serial"] == row["serial"]
    leaf = x509.load_pem_x509_certificates(answer["chain"].encode())
    roots = [x509.load_pem_x509_certificate(p.encode()) for p in bundle["roots"]]
    got = certs.verify_svid(leaf, roots, trust_domain=TD, now=time.time(), where="web's chain")
    assert got.uri == web
    # the key stays on the node, owner-only
    key_file = sandbox.node("n1").run_dir / "identity" / "default" / "web" / "key.pem"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"

    # the CA goes away: the agent keeps its certificate; it comes back
    sandbox.stop_ca()
    assert wait_cert(sandbox, "n1", web)["serial"] == row["serial"]
    sandbox.start_ca()


def test_a_node_cannot_get_a_certificate_for_another_nodes_service_account(
    sandbox: Sandbox,
) -> None:
    """n1 files a CSR for `db`, whose only workload runs on n2: the CA answers with a rejection."""
    db = certs.SpiffeId(TD, "default", "db")
    sandbox.pod_add("n2", "default", "db2", service_account="db")  # ensure one exists on n2
    csr_key, cert_key = keys.csr("n1", db.key), keys.cert("n1", db.key)

    async def ask() -> dict[str, Any]:
        store = await open_store(sandbox.store_url)
        try:
            doc = {
                "v": 1,
                "node": "n1",
                "identity": db.uri,
                "csr": certs.build_csr(certs.new_key(), db),
                "request": "it-1",
            }
            await store.put(csr_key, codec.encode(doc))
            with trio.fail_after(20):
                while True:
                    kv = await store.get(cert_key)
                    if kv is not None:
                        answer = codec.decode(kv)
                        if answer.get("request") == "it-1":
                            assert await store.get(csr_key) is None
                            return dict(answer)
                    await trio.sleep(0.1)
        finally:
            await store.aclose()

    answer = trio.run(ask)
    assert "chain" not in answer
    assert (
        "node 'n1' runs no workload with namespace 'default' and service account 'db'"
        in (answer["error"])
    )
    assert "ca.rejected" in sandbox.ca_log.read_text()
