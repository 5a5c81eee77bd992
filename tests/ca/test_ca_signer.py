"""The signer against a memory store: node authorization, rejections with reasons, bad input."""

from __future__ import annotations

import time
from typing import Any

import trio
from cryptography import x509
from snapshot_docs import key_of, workload

from nodeagent.ca import certs
from nodeagent.ca.signer import Signer
from nodeagent.store import codec, keys, open_store
from nodeagent.store.base import Store

TD = "cluster.local"


def _authority() -> certs.SigningAuthority:
    key, root = certs.create_root(TD, now=time.time())
    return certs.SigningAuthority(key, root, (), (root,))


async def _workload(store: Store, node: str, uid: str, ns: str, sa: str) -> None:
    doc = workload(uid, "10.0.0.1", name=uid, namespace=ns, node=node, sa=sa)
    await store.put(key_of(doc), codec.encode(doc))


def _request(node: str, ident: certs.SpiffeId, *, csr_for: certs.SpiffeId | None = None) -> bytes:
    csr = certs.build_csr(certs.new_key(), csr_for or ident)
    doc = {"v": 1, "node": node, "identity": ident.uri, "csr": csr, "request": "r1"}
    return codec.encode(doc)


async def _ask(store: Store, node: str, ident_key: str, value: bytes) -> dict[str, Any]:
    """Put a request and wait for the answer written after it."""
    rev = await store.put(keys.csr(node, ident_key), value)
    return await _answer(store, node, ident_key, after=rev)


async def _answer(store: Store, node: str, ident_key: str, after: int = 0) -> dict[str, Any]:
    key = keys.cert(node, ident_key)
    with trio.fail_after(10):
        while True:
            kv = await store.get(key)
            if kv is not None and kv.mod_revision > after:
                assert await store.get(keys.csr(node, ident_key)) is None  # request removed
                doc = codec.decode(kv)
                assert isinstance(doc, dict)
                return doc
            await trio.sleep(0.01)


async def test_signs_only_for_workloads_of_the_requesting_node(autojump_clock: object) -> None:
    store = await open_store("memory://")
    auth = _authority()
    web = certs.SpiffeId(TD, "default", "web")
    db = certs.SpiffeId(TD, "default", "db")
    ghost = certs.SpiffeId(TD, "default", "ghost")
    await _workload(store, "n1", "w1", "default", "web")
    await _workload(store, "n2", "w2", "default", "db")
    # a request already waiting before the signer starts is answered too (list on start)
    await store.put(keys.csr("n1", web.key), _request("n1", web))
    signer = Signer(store, auth, TD, ttl=600)
    async with trio.open_nursery() as nursery:
        await nursery.start(signer.run)
        ok = await _answer(store, "n1", web.key)
        assert "error" not in ok
        assert ok["identity"] == web.uri
        assert ok["request"] == "r1"
        leaf = x509.load_pem_x509_certificates(ok["chain"].encode())[0]
        leaf.verify_directly_issued_by(auth.cert)
        assert certs.serial_hex(leaf.serial_number) == ok["serial"]
        assert ok["not_after"] == int(certs.not_after(leaf))
        assert 590 < certs.not_after(leaf) - time.time() <= 600

        # n1 asks for db's identity: db runs on n2, not on n1
        wrong_node = await _ask(store, "n1", db.key, _request("n1", db))
        assert "node 'n1' runs no workload" in wrong_node["error"]
        assert "service account 'db'" in wrong_node["error"]
        assert "chain" not in wrong_node

        none = await _ask(store, "n1", ghost.key, _request("n1", ghost))
        assert "may not have spiffe://cluster.local/ns/default/sa/ghost" in none["error"]

        # the CSR names another identity than the request
        san = await _ask(store, "n1", web.key, _request("n1", web, csr_for=db))
        assert "only subjectAltName must be the URI" in san["error"]

        # a request filed under another node's key than it claims
        lying = await _ask(store, "n2", web.key, _request("n1", web))
        assert "names node 'n1' but sits under node 'n2'" in lying["error"]

        # garbage: rejected by key, the signer keeps going
        junk = await _ask(store, "n1", "default/junk", b"\xc1\xc1")
        assert "does not decode" in junk["error"]
        again = await _ask(store, "n1", web.key, _request("n1", web))
        assert "error" not in again
        assert again["serial"] != ok["serial"]
        assert signer.stats["signed"] == 2
        assert signer.stats["rejected"] == 5
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_publishes_bundle_with_all_roots_and_a_crl() -> None:
    store = await open_store("memory://")
    auth, old = _authority(), _authority()
    signer = Signer(store, auth, TD, extra_roots=[old.cert], revoked=lambda: {0xABC})
    await signer.publish()
    kv = await store.get(keys.CA_BUNDLE)
    assert kv is not None
    bundle = codec.decode(kv)
    roots = [x509.load_pem_x509_certificate(p.encode()) for p in bundle["roots"]]
    assert roots == [auth.cert, old.cert]
    assert bundle["trust_domain"] == TD
    crl_kv = await store.get(keys.CA_CRL)
    assert crl_kv is not None
    crl = codec.decode(crl_kv)
    assert crl["revoked"] == ["abc"]
    assert certs.verify_crl(crl["crl"], (), roots, now=time.time()) == {0xABC}
    await store.aclose()


async def test_request_of_a_dead_node_is_dropped(autojump_clock: object) -> None:
    store = await open_store("memory://")
    auth = _authority()
    web = certs.SpiffeId(TD, "default", "web")
    await _workload(store, "n1", "w1", "default", "web")
    lease = await store.grant_lease(5)
    await store.put(keys.csr("n1", web.key), _request("n1", web), lease=lease)
    kvs, _ = await store.range(keys.CSR)
    await store.revoke_lease(lease)
    signer = Signer(store, auth, TD)
    await signer.handle(kvs[0])  # the request as read before the node died
    assert await store.get(keys.cert("n1", web.key)) is None
    await store.aclose()
