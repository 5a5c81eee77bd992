"""The tunnel end to end between two real pod namespaces: real iptables, real TLS 1.3, real
PodProxies, an in-process identity provider. No sandbox and no store: the snapshot is built by
hand, so every case is quick and failures point at the data plane."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl

import pytest
import trio
from pki import ThrowawayCA, spiffe
from tunnel_net import (
    A_ID,
    A_IP,
    APP_PORT,
    B_ID,
    B_IP,
    VIP,
    Namespaces,
    app_call,
    build_snapshot,
    config,
    namespaces,
    open_stream,
    running_mesh,
    settled,
)

from nodeagent.contract import MESH_MARK, POD_LISTENER_PORTS, TUNNEL_PORT
from nodeagent.tunnel import TunnelError
from nodeagent.tunnel.client import connect_socket

pytestmark = pytest.mark.root
__all__ = ["namespaces"]  # the fixture, imported for pytest


def expect(payload: bytes, src: str = A_IP) -> bytes:
    return f"{src} {hashlib.sha256(payload).hexdigest()}".encode()


async def test_service_vip_through_the_tunnel_keeps_the_client_ip(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        payload = os.urandom(8 * 1024 * 1024)
        assert await app_call(namespaces.a, (VIP, 80), payload) == expect(payload)
        # A pod IP (the headless/no-VIP path) goes through the tunnel too.
        assert await app_call(namespaces.a, (B_IP, APP_PORT), b"x") == expect(b"x")
        assert mesh.app.peers == [A_IP, A_IP]
        await settled(mesh.a, mesh.b)
        a, b = mesh.a.statistics(), mesh.b.statistics()
        assert a["outbound"]["opened"] == 2
        assert a["outbound"]["bytes_sent"] == len(payload) + 1
        assert a["outbound"]["mtls"] == 2
        assert b["inbound"]["opened"] == b["inbound"]["mtls"] == 2  # nothing in plaintext


async def test_wrong_server_identity_is_refused(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        with pytest.raises(
            TunnelError, match=r"expected spiffe://cluster\.local/ns/shop/sa/db"
        ) as e:
            await open_stream(mesh, APP_PORT, expected=spiffe("shop", "db"))
        assert e.value.flag == "identity_mismatch"
        # The proxy checks the same thing: the snapshot says B runs as sa "db".
        mesh.snap[0] = build_snapshot(b_sa="db")
        assert await app_call(namespaces.a, (VIP, 80), b"secret") == b""
        assert mesh.app.peers == []
        await settled(mesh.a, mesh.b)
        assert mesh.a.statistics()["outbound"]["failed"] == 1


async def _raw_tls(namespaces: Namespaces, ctx: ssl.SSLContext) -> bytes:
    raw = namespaces.a.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await connect_socket(raw, (B_IP, TUNNEL_PORT), 5)
        from nodeagent.tunnel import TlsStream

        stream = TlsStream.wrap(raw, ctx, server_side=False)
        with trio.fail_after(5):
            try:
                await stream.do_handshake()
                await stream.send_all(b"hello")
                return await stream.receive_some(100)
            except (ssl.SSLError, OSError, trio.BrokenResourceError) as exc:
                return f"error: {exc}".encode()
            finally:
                await stream.aclose()
    finally:
        raw.close()


async def test_client_without_a_mesh_certificate_is_refused(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        no_cert.check_hostname = False
        no_cert.load_verify_locations(cadata=mesh.identities.ca.pem.decode())
        reply = await _raw_tls(namespaces, no_cert)
        assert reply == b"" or reply.startswith(b"error"), reply
        # A certificate from another CA is refused the same way.
        rogue_ca = ThrowawayCA("rogue")
        from pki import LocalIdentityProvider

        rogue = LocalIdentityProvider(rogue_ca)
        try:
            rogue.ensure(A_ID)
            ctx = rogue.client_context(A_ID)
            ctx.verify_mode = ssl.CERT_NONE  # we only want to present the rogue certificate
            reply = await _raw_tls(namespaces, ctx)
            assert reply == b"" or reply.startswith(b"error"), reply
        finally:
            rogue.close()
        assert mesh.app.peers == []
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["failed"] == 2


async def test_revoked_client_certificate_is_refused(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        mesh.identities.revoked.add(mesh.identities.serials[A_ID])
        assert await app_call(namespaces.a, (VIP, 80), b"x") == b""
        assert mesh.app.peers == []


async def test_pod_without_certificate_waits_then_fails_closed(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces, identity_wait=0.5) as mesh:
        mesh.identities.release(A_ID)
        mesh.identities.hold.add(A_ID)
        assert await app_call(namespaces.a, (VIP, 80), b"plaintext?") == b""
        assert mesh.app.peers == []
        await settled(mesh.a, mesh.b)
        assert mesh.a.statistics()["outbound"]["failed"] == 1

        async def grant_soon() -> None:
            await trio.sleep(0.1)
            mesh.identities.grant(A_ID)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grant_soon)
            assert await app_call(namespaces.a, (VIP, 80), b"y") == expect(b"y")


def _policy(name: str, action: str, rules: list[object]) -> object:
    return config("AuthorizationPolicy", name, "shop", {"action": action, "rules": rules})


async def test_authorization_policy_allow_and_deny(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        deny = _policy("deny-sleep", "DENY", [
            {"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}
        ])  # fmt: skip
        mesh.snap[0] = build_snapshot(deny)
        assert await app_call(namespaces.a, (VIP, 80), b"x") == b""
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["denied"] == 1
        rule = {
            "from": [{"source": {"namespaces": ["client"]}}],
            "to": [{"operation": {"ports": ["8080"]}}],
        }
        allow = _policy("allow-client-ns", "ALLOW", [rule])
        mesh.snap[0] = build_snapshot(allow)
        assert await app_call(namespaces.a, (VIP, 80), b"x") == expect(b"x")
        other_port = _policy("allow-other-port", "ALLOW", [
            {"to": [{"operation": {"ports": ["9999"]}}]}
        ])  # fmt: skip
        mesh.snap[0] = build_snapshot(other_port)
        assert await app_call(namespaces.a, (VIP, 80), b"x") == b""
        assert mesh.app.peers == [A_IP]
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["denied"] == 2


def _mtls(mode: str) -> object:
    return config("PeerAuthentication", "default", "shop", {"mtls": {"mode": mode}})


async def test_plaintext_client_permissive_accepted_strict_refused(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        # The mesh mark lets this socket out of A uncaptured: a plaintext client reaching B.
        mark = MESH_MARK
        assert await app_call(namespaces.a, (B_IP, APP_PORT), b"p", mark=mark) == expect(b"p")
        mesh.snap[0] = build_snapshot(_mtls("STRICT"))
        assert await app_call(namespaces.a, (B_IP, APP_PORT), b"p", mark=mark) == b""
        # ...while the same client through the mesh still gets in.
        assert await app_call(namespaces.a, (B_IP, APP_PORT), b"m") == expect(b"m")
        assert mesh.app.peers == [A_IP, A_IP]
        await settled(mesh.a, mesh.b)
        stats = mesh.b.statistics()
        assert (stats["inbound"]["opened"], stats["inbound"]["mtls"]) == (3, 1)
        assert stats["inbound"]["denied"] == 1


async def test_streams_share_one_connection_and_half_close(namespaces: Namespaces) -> None:
    """Three CONNECT streams in a row: one TLS connection (one handshake), each stream's
    END_STREAM reaches the app as EOF and the app's answer comes back after it."""
    async with running_mesh(namespaces) as mesh:
        infos = []
        for _ in range(3):
            stream, info = await open_stream(mesh, APP_PORT)
            infos.append(info)
            await stream.send_all(b"abc")
            await stream.send_eof()
            want = f"{A_IP} {hashlib.sha256(b'abc').hexdigest()}".encode()
            got = b""
            while chunk := await stream.receive_some(100):
                got += chunk
            assert got == want
            await stream.aclose()
        assert [i.reused for i in infos] == [False, True, True]
        assert all(i.peer_identity == B_ID for i in infos)
        stats = mesh.a.core.pool.statistics()
        assert (stats["connections_opened"], stats["streams_opened"]) == (1, 3)
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["opened"] == 3


@pytest.mark.parametrize("port", sorted(POD_LISTENER_PORTS))
async def test_tunnel_to_an_agent_listener_port_is_refused(
    namespaces: Namespaces, port: int
) -> None:
    """A real CONNECT whose :authority names one of B's agent ports gets status 400 at
    once (no connection to B's own listener), and the tunnel keeps serving ordinary requests."""
    async with running_mesh(namespaces) as mesh:
        with trio.fail_after(5), pytest.raises(TunnelError, match="refused: 400") as e:
            await open_stream(mesh, port)
        assert e.value.flag == "bad_request"
        await settled(mesh.a, mesh.b)
        inbound = mesh.b.statistics()["inbound"]
        assert (inbound["opened"], inbound["denied"]) == (1, 1)
        assert await app_call(namespaces.a, (B_IP, APP_PORT), b"x") == expect(b"x")
