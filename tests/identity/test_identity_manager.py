"""The identity manager against a real signer on a memory store (trio autojump clock), and real
TLS 1.3 handshakes between the contexts it builds."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest
import trio
from helpers_identity import (
    TD,
    RunningSigner,
    add_workload,
    authority,
    cert_of,
    handshake,
    leaf_context,
    spiffe,
    wall_clock,
)

from nodeagent.ca import certs
from nodeagent.ca.signer import Signer
from nodeagent.identity.api import IdentityProvider, IdentityUnavailable, PeerRejected
from nodeagent.identity.manager import IdentityManager
from nodeagent.store import codec, keys, open_store
from nodeagent.store.base import Store

WEB = spiffe("default", "web")
CLIENT = spiffe("default", "client")


async def _store() -> Store:
    store = await open_store("memory://")
    await add_workload(store, "n1", "w1", "default", "web")
    await add_workload(store, "n1", "w2", "default", "client")
    return store


def _serial(m: IdentityManager, identity: str) -> str | None:
    rows = {r["identity"]: r for r in m.certificates()}
    serial = rows[identity]["serial"]
    assert serial is None or isinstance(serial, str)
    return serial


async def test_obtains_a_certificate_and_reports_it(autojump_clock: object) -> None:
    store = await _store()
    clock = wall_clock()
    signer = Signer(store, authority(), TD, ttl=3600, clock=clock)
    m = IdentityManager(store, "n1", TD, clock=clock)
    provider: IdentityProvider = m  # the data plane's contract
    async with trio.open_nursery() as nursery:
        await nursery.start(signer.run)
        await nursery.start(m.run)
        with pytest.raises(IdentityUnavailable, match="not ensured"):
            m.server_context(WEB)
        provider.ensure(WEB)
        provider.ensure(WEB)  # idempotent
        await provider.wait_ready(WEB, within=10)
        [row] = m.certificates()
        assert row["identity"] == WEB
        assert row["state"] == "valid"
        assert row["serial"]
        assert row["not_after"]
        assert row["not_before"]
        assert not any("key" in k for k in row)
        assert m.statistics()["roots"] == 1
        # no workload runs as `ghost` on n1: the CA says so, and it shows on /certs
        ghost = spiffe("default", "ghost")
        m.ensure(ghost)
        with pytest.raises(IdentityUnavailable, match="runs no workload"):
            await m.wait_ready(ghost, within=5)
        rows = {r["identity"]: r for r in m.certificates()}
        assert rows[ghost]["state"] == "pending"
        assert rows[ghost]["failures"] >= 1
        m.release(ghost)
        assert [r["identity"] for r in m.certificates()] == [WEB]
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_renews_at_half_life_and_keeps_serving_while_the_ca_is_down(
    autojump_clock: object, tmp_path: Path
) -> None:
    store = await _store()
    clock = wall_clock()
    signer = Signer(store, authority(), TD, ttl=3600, clock=clock)
    m = IdentityManager(
        store,
        "n1",
        TD,
        clock=clock,
        state_dir=tmp_path,
        request_timeout=5,
        backoff_initial=10,
        backoff_max=80,
    )
    async with trio.open_nursery() as nursery:
        ca = RunningSigner(nursery, signer)
        await ca.start()
        await nursery.start(m.run)
        m.ensure(WEB)
        await m.wait_ready(WEB, within=10)
        first = _serial(m, WEB)
        leaf = m._identities[WEB].leaf
        assert leaf is not None
        half = (certs.not_before(leaf) + certs.not_after(leaf)) / 2
        # just before half-life: still the first certificate
        await trio.sleep(half - clock() - 5)
        assert _serial(m, WEB) == first
        await trio.sleep(10)
        second = _serial(m, WEB)
        assert second != first
        assert m.certificates()[0]["renewals"] == 1

        # the CA goes away; at the next half-life renewal fails, with growing backoff
        ca.stop()
        leaf = m._identities[WEB].leaf
        assert leaf is not None
        half = (certs.not_before(leaf) + certs.not_after(leaf)) / 2
        await trio.sleep(half - clock() + 1)
        attempts: list[float] = []
        while len(attempts) < 4:
            before = m._identities[WEB].failures
            while m._identities[WEB].failures == before:
                await m.wait_changed()
            attempts.append(trio.current_time())
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        # each attempt: backoff (10, 20, 40 s) + the request timeout (5 s)
        assert gaps == pytest.approx([15, 25, 45], abs=0.5)
        row = m.certificates()[0]
        assert row["serial"] == second
        assert row["state"] == "renewing"
        assert "no answer from the CA" in row["last_error"]
        m.server_context(WEB)  # the still-valid certificate keeps serving
        m.client_context(WEB)

        # the key and chain are on disk, owner-only
        d = tmp_path / "default" / "web"
        assert stat.S_IMODE(os.stat(d / "key.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d / "chain.pem").st_mode) == 0o600

        # the CA returns: the next attempt renews
        await ca.start()
        with trio.fail_after(200):
            while _serial(m, WEB) == second:
                await m.wait_changed()
        assert m.certificates()[0]["state"] == "valid"
        ca.stop()
        nursery.cancel_scope.cancel()

    # a restarted agent, with the store's CA gone quiet, serves its cached certificate at once
    m2 = IdentityManager(store, "n1", TD, clock=clock, state_dir=tmp_path, request_timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(m2.run)
        m2.ensure(WEB)
        m2.server_context(WEB)
        assert _serial(m2, WEB) == _serial(m, WEB)
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_tls13_handshake_between_server_and_client_contexts() -> None:
    store = await _store()
    auth = authority()
    signer = Signer(store, auth, TD, ttl=3600)
    m = IdentityManager(store, "n1", TD)
    async with trio.open_nursery() as nursery:
        await nursery.start(signer.run)
        await nursery.start(m.run)
        m.ensure(WEB)
        m.ensure(CLIENT)
        await m.wait_ready(WEB, within=10)
        await m.wait_ready(CLIENT, within=10)
        server_ctx = m.server_context(WEB)
        assert m.server_context(WEB) is server_ctx  # cached
        out = await handshake(server_ctx, m.client_context(CLIENT))
        assert out["errors"] == []
        assert out["version"] == "TLSv1.3"
        assert out["echo"] == b"x"
        assert m.peer_identity(out["client_cert"]) == CLIENT
        assert m.peer_identity(out["server_cert"]) == WEB

        # a client whose certificate comes from another CA is refused by the server
        stranger = leaf_context(authority(), CLIENT, m._bundle_pem, server=False)
        out = await handshake(server_ctx, stranger)
        assert any(side == "server" for side, _ in out["errors"])
        assert "client_cert" not in out
        # and a server with a foreign certificate is refused by our client
        fake = leaf_context(authority(), WEB, m._bundle_pem, server=True)
        out = await handshake(fake, m.client_context(CLIENT))
        assert any(side == "client" for side, _ in out["errors"])
        assert "server_cert" not in out
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_two_roots_in_the_bundle_and_revocation() -> None:
    store = await _store()
    auth, old = authority(), authority()
    signer = Signer(store, auth, TD, ttl=3600, extra_roots=[old.cert])
    m = IdentityManager(store, "n1", TD)
    async with trio.open_nursery() as nursery:
        await nursery.start(signer.run)
        await nursery.start(m.run)
        m.ensure(WEB)
        await m.wait_ready(WEB, within=10)
        assert m.statistics()["roots"] == 2
        server_ctx = m.server_context(WEB)
        # clients with certificates of either root are accepted
        peers = []
        for a in (auth, old):
            out = await handshake(server_ctx, leaf_context(a, CLIENT, m._bundle_pem, server=False))
            assert out["errors"] == []
            peers.append(out["client_cert"])
            assert m.peer_identity(out["client_cert"]) == CLIENT

        # revoke the first client's serial: the CRL reaches the manager, the peer is rejected
        revoked = cert_of(peers[0]).serial_number
        signer._revoked = lambda: {revoked}
        await signer.publish()
        with trio.fail_after(5):
            while m.statistics()["revoked"] != 1:
                await m.wait_changed()
        with pytest.raises(PeerRejected, match="is revoked"):
            m.peer_identity(peers[0])
        assert m.peer_identity(peers[1]) == CLIENT
        # a CRL signed by a stranger is ignored (the old one stays)
        bad = {"v": 1, "crl": certs.build_crl(authority(), set(), now=0), "issuer_chain": ""}
        await store.put(keys.CA_CRL, codec.encode(bad))
        await store.put(keys.CA_BUNDLE, b"\xc1")  # garbage bundle: logged, ignored
        with trio.fail_after(5):  # both refusals counted: the manager did read them
            while m.statistics()["rejected_ca_documents"] != 2:
                await m.wait_changed()
        assert m.statistics()["revoked"] == 1
        assert m.statistics()["roots"] == 2
        with pytest.raises(PeerRejected, match="peer certificate: error parsing"):
            m.peer_identity(b"not a certificate")
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_own_revoked_certificate_is_replaced(autojump_clock: object) -> None:
    store = await _store()
    clock = wall_clock()
    signer = Signer(store, authority(), TD, ttl=3600, clock=clock)
    m = IdentityManager(store, "n1", TD, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(signer.run)
        await nursery.start(m.run)
        m.ensure(WEB)
        await m.wait_ready(WEB, within=10)
        first = _serial(m, WEB)
        assert first is not None
        signer._revoked = lambda: {int(first, 16)}
        await signer.publish()
        with trio.fail_after(10):
            while _serial(m, WEB) == first:
                await m.wait_changed()
        nursery.cancel_scope.cancel()
    await store.aclose()
