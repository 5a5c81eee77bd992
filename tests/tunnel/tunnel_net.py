"""Two meshed "pods" in real namespaces, each with redirection, listeners and a PodProxy.

Pod A (client, ns `client`, sa `sleep`) and pod B (server, ns `shop`, sa `web`) are two network
namespaces joined by a veth pair (10.124.0.0/24); the service `web` has the VIP 10.96.0.10:80 →
B:8080. Both PodProxies run in this test's trio run with an in-process identity provider built
on a throwaway CA (pki.py). Namespaces are deleted in teardown even on failure.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from netns_helpers import ip, veth_pair
from pki import LocalIdentityProvider, ThrowawayCA, spiffe
from snapshot_docs import service, snapshot_of, workload

from nodeagent.balance import Registry
from nodeagent.inpod import (
    Netns,
    RedirectionSpec,
    aapply_redirection,
    bind_listeners,
)
from nodeagent.proxy.pod import PodProxy
from nodeagent.snapshot import Snapshot, Workload
from nodeagent.tunnel import ConnectRequest, HboneStream, SourceInfo, TunnelInfo, TunnelPool

A_IP, B_IP, VIP = "10.124.0.2", "10.124.0.3", "10.96.0.10"
A_ID, B_ID = spiffe("client", "sleep"), spiffe("shop", "web")
APP_PORT = 8080


@dataclass
class Namespaces:
    a: Netns
    b: Netns
    names: tuple[str, str]


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    with veth_pair("tun", (("a", A_IP), ("b", B_IP))) as (names, (a, b)):
        for name in names:
            ip("-n", name, "route", "add", "default", "dev", "eth0")
        yield Namespaces(a, b, names)


def config(kind: str, name: str, ns: str, spec: dict[str, Any]) -> Any:
    """A security policy (AuthorizationPolicy, PeerAuthentication) document."""
    meta = {"name": name, "namespace": ns}
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec}


def build_snapshot(*extra: Any, b_sa: str = "web") -> Snapshot:
    docs = [
        workload("a", A_IP, {"app": "sleep"}, name="a", namespace="client", sa="sleep"),
        workload("b", B_IP, {"app": "web"}, name="b", namespace="shop", sa=b_sa),
        service("web", namespace="shop", cluster_ip=VIP, port_name="tcp", target=APP_PORT),
        *extra,
    ]
    return snapshot_of(docs)


@dataclass
class App:
    """A TCP server in pod B: after the client's EOF, replies `<peer ip> <sha256 of input>`."""

    peers: list[str] = field(default_factory=list)

    async def serve(self, netns: Netns, *, task_status: trio.TaskStatus[None]) -> None:
        sock = netns.socket(socket.AF_INET, socket.SOCK_STREAM, mark=0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", APP_PORT))
        sock.listen(64)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        self.peers.append(peer)
        h = hashlib.sha256()
        try:
            while chunk := await stream.receive_some(262144):
                h.update(chunk)
            await stream.send_all(f"{peer} {h.hexdigest()}".encode())
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


@dataclass
class Mesh:
    ns: Namespaces
    identities: LocalIdentityProvider
    snap: list[Snapshot]
    app: App
    a: PodProxy
    b: PodProxy


def me(uid: str, ns: str, sa: str, ip_: str, labels: dict[str, str]) -> Workload:
    return Workload(uid, uid, ns, "node-1", (ip_,), labels, {}, sa, spiffe(ns, sa))


@asynccontextmanager
async def running_mesh(
    ns: Namespaces, *, identity_wait: float = 2.0, redirect_a: bool = True
) -> AsyncIterator[Mesh]:
    ca = ThrowawayCA()
    identities = LocalIdentityProvider(ca)
    identities.ensure(A_ID)
    identities.ensure(B_ID)
    holder = [build_snapshot()]
    spec = RedirectionSpec.from_annotations({})
    if redirect_a:  # off: pod A's netns is a plain client (the interop test's Node process)
        await aapply_redirection(ns.a, spec)
    await aapply_redirection(ns.b, spec)
    proxies = []
    for netns, wl in (
        (ns.a, me("a", "client", "sleep", A_IP, {"app": "sleep"})),
        (ns.b, me("b", "shop", "web", B_IP, {"app": "web"})),
    ):
        proxies.append(
            PodProxy(
                wl.ref,
                netns,
                bind_listeners(netns),
                registry=Registry(on_event=None),
                workload=wl,
                identities=identities,
                snapshot=lambda: holder[0],
                identity_wait=identity_wait,
            )
        )
    app = App()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve, ns.b)
            for proxy in proxies:
                await nursery.start(proxy.run)
            yield Mesh(ns, identities, holder, app, proxies[0], proxies[1])
            nursery.cancel_scope.cancel()
    finally:
        identities.close()


async def settled(*proxies: PodProxy) -> None:
    """Wait (bounded) until every connection the proxies opened has finished and been counted:
    the app can read its reply a few scheduling steps before the proxy closes its side."""
    for _ in range(1000):
        if all(d["opened"] == d["closed"] for p in proxies for d in p.statistics().values()):
            return
        await trio.sleep(0.005)
    raise AssertionError("connections still open after 5 s")


async def app_call(
    netns: Netns, dst: tuple[str, int], payload: bytes, *, mark: int = 0, limit: float = 10
) -> bytes:
    """Connect from `netns` as an application would, send, half-close, read the reply."""
    sock = trio.socket.from_stdlib_socket(
        netns.socket(socket.AF_INET, socket.SOCK_STREAM, mark=mark)
    )
    with trio.fail_after(limit):
        await sock.connect(dst)
        stream = trio.SocketStream(sock)
        try:
            view = memoryview(payload)
            for i in range(0, len(view), 1 << 20):
                await stream.send_all(view[i : i + (1 << 20)])
            await stream.send_eof()
            reply = bytearray()
            while chunk := await stream.receive_some(65536):
                reply += chunk
            return bytes(reply)
        except trio.BrokenResourceError:
            return b""
        finally:
            await stream.aclose()


async def open_stream(
    mesh: Mesh, port: int, *, expected: str = B_ID, pool: TunnelPool | None = None
) -> tuple[HboneStream, TunnelInfo]:
    """A CONNECT stream from pod A to B's `port` (on A's own pool unless `pool` is given)."""
    pool = pool if pool is not None else mesh.a.core.pool
    return await pool.open_stream(
        source_identity=A_ID,
        expected_identity=expected,
        request=ConnectRequest(B_IP, port, source=SourceInfo("client", "a", A_ID, A_IP)),
    )
