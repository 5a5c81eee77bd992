"""Policy applies to connections already open: real namespaces, real iptables and TLS, the two
PodProxies of tunnel_net. A DENY AuthorizationPolicy, a switch to STRICT and a revoked client
certificate close the destination's open connections; an unrelated policy leaves them alone."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from tunnel_net import (
    A_ID,
    A_IP,
    APP_PORT,
    B_IP,
    VIP,
    Mesh,
    Namespaces,
    build_snapshot,
    config,
    namespaces,
    open_stream,
    running_mesh,
    settled,
)

from nodeagent.contract import MESH_MARK
from nodeagent.inpod import Netns
from nodeagent.proxy.connector import denied_by_policy
from nodeagent.tunnel import TunnelError

pytestmark = pytest.mark.root
__all__ = ["namespaces"]  # the fixture, imported for pytest


@asynccontextmanager
async def open_app_conn(
    netns: Netns, dst: tuple[str, int], *, mark: int = 0
) -> AsyncIterator[trio.SocketStream]:
    sock = trio.socket.from_stdlib_socket(
        netns.socket(socket.AF_INET, socket.SOCK_STREAM, mark=mark)
    )
    with trio.fail_after(5):
        await sock.connect(dst)
    stream = trio.SocketStream(sock)
    try:
        yield stream
    finally:
        await stream.aclose()


async def until_registered(mesh: Mesh, count: int) -> None:
    """Bounded wait until B's proxy has `count` open inbound connections registered."""
    for _ in range(500):
        if len(mesh.b.inbound.live) == count:
            return
        await trio.sleep(0.01)
    raise AssertionError(f"{len(mesh.b.inbound.live)} connections registered at B, not {count}")


async def closed_within(stream: trio.SocketStream, limit: float) -> float:
    """Seconds until the app's connection ends (EOF or reset); fails after `limit`."""
    start = trio.current_time()
    with trio.fail_after(limit):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
    return trio.current_time() - start


async def still_works(stream: trio.SocketStream, sent: bytes) -> bytes:
    await stream.send_eof()
    reply = bytearray()
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return bytes(reply)


def expect(payload: bytes, src: str = A_IP) -> bytes:
    return f"{src} {hashlib.sha256(payload).hexdigest()}".encode()


def deny_sleep() -> object:
    return config("AuthorizationPolicy", "deny-sleep", "shop", {"action": "DENY", "rules": [
        {"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}
    ]})  # fmt: skip


async def test_open_tunnel_closed_when_a_deny_policy_arrives(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        async with open_app_conn(namespaces.a, (VIP, 80)) as stream:
            await stream.send_all(b"hello")
            await until_registered(mesh, 1)
            mesh.snap[0] = build_snapshot(deny_sleep())
            mesh.b.inbound.policy_changed()  # what the agent's snapshot swap listener does
            took = await closed_within(stream, 3)
        assert took < 1
        await settled(mesh.a, mesh.b)
        inbound = mesh.b.statistics()["inbound"]
        assert inbound["closed_by_policy"] == 1
        assert inbound["denied"] == 1
        assert len(mesh.b.inbound.live) == 0
        # The next connection is refused at accept, as before.
        async with open_app_conn(namespaces.a, (VIP, 80)) as stream:
            await stream.send_all(b"again")
            assert await closed_within(stream, 5) >= 0
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["denied"] == 2
        assert mesh.b.statistics()["inbound"]["closed_by_policy"] == 1


async def test_open_tunnel_kept_when_an_unrelated_policy_arrives(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:
        async with (
            open_app_conn(namespaces.a, (VIP, 80)) as stream,
            # The witness: a plaintext connection the same snapshot does deny (STRICT). Its
            # close proves the re-check ran over every open connection, the tunnel included.
            open_app_conn(namespaces.a, (B_IP, APP_PORT), mark=MESH_MARK) as witness,
        ):
            await stream.send_all(b"hello")
            await witness.send_all(b"plain")
            await until_registered(mesh, 2)
            unrelated = [
                config(
                    "AuthorizationPolicy",
                    "deny-db",
                    "shop",
                    {
                        "action": "DENY",
                        "rules": [
                            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/db"]}}]}
                        ],
                    },
                ),
                config(
                    "AuthorizationPolicy",
                    "other-port",
                    "shop",
                    {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]},
                ),
                config("PeerAuthentication", "default", "shop", {"mtls": {"mode": "STRICT"}}),
            ]
            mesh.snap[0] = build_snapshot(*unrelated)
            mesh.b.inbound.policy_changed()
            assert await closed_within(witness, 2) < 2
            assert len(mesh.b.inbound.live) == 1
            assert await still_works(stream, b"hello") == expect(b"hello")
        await settled(mesh.a, mesh.b)
        inbound = mesh.b.statistics()["inbound"]
        assert (inbound["closed_by_policy"], inbound["denied"]) == (1, 1)  # the witness only


async def test_open_plaintext_connection_closed_on_switch_to_strict(
    namespaces: Namespaces,
) -> None:
    async with running_mesh(namespaces) as mesh:
        async with (
            open_app_conn(namespaces.a, (B_IP, APP_PORT), mark=MESH_MARK) as plain,
            open_app_conn(namespaces.a, (VIP, 80)) as tunneled,
        ):
            await plain.send_all(b"plain")
            await tunneled.send_all(b"mtls")
            await until_registered(mesh, 2)
            mesh.snap[0] = build_snapshot(
                config("PeerAuthentication", "default", "shop", {"mtls": {"mode": "STRICT"}})
            )
            mesh.b.inbound.policy_changed()
            assert await closed_within(plain, 2) < 2
            # The mTLS connection is not affected by STRICT.
            assert await still_works(tunneled, b"mtls") == expect(b"mtls")
        await settled(mesh.a, mesh.b)
        inbound = mesh.b.statistics()["inbound"]
        assert (inbound["closed_by_policy"], inbound["denied"]) == (1, 1)


async def test_open_tunnel_closed_when_the_client_certificate_is_revoked(
    namespaces: Namespaces,
) -> None:
    async with running_mesh(namespaces) as mesh:
        async with open_app_conn(namespaces.a, (VIP, 80)) as stream:
            await stream.send_all(b"hello")
            await until_registered(mesh, 1)
            mesh.identities.revoke(A_ID)
            # No snapshot change: the CRL change alone closes it.
            assert await closed_within(stream, 2) < 0.5
        await settled(mesh.a, mesh.b)
        assert mesh.b.statistics()["inbound"]["closed_by_policy"] == 1


async def test_a_401_is_flagged_denied_and_other_refusals_are_not(namespaces: Namespaces) -> None:
    async with running_mesh(namespaces) as mesh:

        async def tunnel(port: int) -> TunnelError:
            with pytest.raises(TunnelError) as e:
                await open_stream(mesh, port)
            return e.value

        # Nothing listens on 9999 in B: the server answers 503, a refusal but not a denial.
        unreachable = await tunnel(9999)
        assert (unreachable.flag, unreachable.denied) == ("unavailable", False)
        assert ": 503" in unreachable.msg
        assert not denied_by_policy(unreachable)
        mesh.snap[0] = build_snapshot(deny_sleep())
        denied = await tunnel(APP_PORT)
        assert (denied.flag, denied.denied) == ("denied", True)
        assert ": 401" in denied.msg
        assert denied_by_policy(denied)
