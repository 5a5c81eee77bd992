"""Real connections between a captured "pod" and a "peer" namespace: what is captured, where it
lands, what bypasses capture, and the transparent delivery path (connmark + ip rule)."""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
from collections.abc import AsyncIterator

import pytest
import trio
from inpod_net import PEER_IP, PEER_IP2, POD_IP, Pair

from nodeagent.contract import (
    INBOUND_PLAINTEXT_PORT,
    MESH_MARK,
    OUTBOUND_CAPTURE_PORT,
    PROBE_SOURCE,
    TUNNEL_PORT,
)
from nodeagent.inpod import (
    ListenerError,
    Netns,
    PodListeners,
    RedirectionSpec,
    apply_redirection,
    bind_listeners,
    original_dst,
)

pytestmark = pytest.mark.root
TIMEOUT = 5


def _listen(ns: Netns, host: str, port: int, *, mark: int = 0) -> trio.socket.SocketType:
    s = ns.socket(mark=mark)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    return trio.socket.from_stdlib_socket(s)


async def _connect(
    ns: Netns,
    dst: tuple[str, int],
    *,
    mark: int = 0,
    src: str | None = None,
    transparent: bool = False,
) -> trio.socket.SocketType:
    s = trio.socket.from_stdlib_socket(ns.socket(mark=mark, transparent=transparent))
    if src is not None:
        await s.bind((src, 0))
    with trio.fail_after(TIMEOUT):
        await s.connect(dst)
    return s


async def _accept(listener: trio.socket.SocketType) -> tuple[trio.socket.SocketType, str]:
    with trio.fail_after(TIMEOUT):
        conn, addr = await listener.accept()
    return conn, addr[0]


def _pending(listener: trio.socket.SocketType) -> bool:
    return bool(select.select([listener.fileno()], [], [], 0)[0])


@pytest.fixture
async def captured(pair: Pair) -> AsyncIterator[tuple[Pair, PodListeners]]:
    spec = RedirectionSpec(
        exclude_outbound_ports=(8081,),
        exclude_inbound_ports=(8082,),
        exclude_outbound_cidrs=(ipaddress.IPv4Network("10.123.0.96/27"),),
    )
    await pair.pod.arun(apply_redirection, pair.pod, spec)
    listeners = bind_listeners(pair.pod)
    try:
        yield pair, listeners
    finally:
        await listeners.aclose()


async def test_unmarked_outbound_is_captured_with_original_dst(
    captured: tuple[Pair, PodListeners],
) -> None:
    pair, ls = captured
    server = _listen(pair.peer, PEER_IP, 8080)
    with server:
        app = await _connect(pair.pod, (PEER_IP, 8080))
        conn, src = await _accept(ls.outbound.socket)
        with app, conn:
            assert original_dst(conn) == (PEER_IP, 8080)
            assert src == POD_IP
            await app.send(b"hello")
            assert await conn.recv(16) == b"hello"
        assert not _pending(server)


async def test_marked_socket_bypasses_capture(captured: tuple[Pair, PodListeners]) -> None:
    pair, ls = captured
    server = _listen(pair.peer, PEER_IP, 8080)
    with server:
        agent = await _connect(pair.pod, (PEER_IP, 8080), mark=MESH_MARK)
        conn, src = await _accept(server)
        with agent, conn:
            assert src == POD_IP
    assert not _pending(ls.outbound.socket)


async def test_inbound_lands_on_15006_with_original_dst(
    captured: tuple[Pair, PodListeners],
) -> None:
    pair, ls = captured
    # Nothing listens on 9999 in the pod: without capture this would be refused.
    peer = await _connect(pair.peer, (POD_IP, 9999))
    conn, src = await _accept(ls.inbound.socket)
    with peer, conn:
        assert src == PEER_IP
        assert original_dst(conn) == (POD_IP, 9999)


async def test_tunnel_port_is_not_redirected(captured: tuple[Pair, PodListeners]) -> None:
    pair, ls = captured
    peer = await _connect(pair.peer, (POD_IP, TUNNEL_PORT))
    conn, src = await _accept(ls.tunnel.socket)
    with peer, conn:
        assert src == PEER_IP
        assert original_dst(conn) == (POD_IP, TUNNEL_PORT)  # conntrack saw no NAT
    assert not _pending(ls.inbound.socket)


async def test_kubelet_probe_is_not_captured(captured: tuple[Pair, PodListeners]) -> None:
    pair, ls = captured
    app = _listen(pair.pod, "0.0.0.0", 8080)
    with app:
        probe = await _connect(pair.peer, (POD_IP, 8080), src=PROBE_SOURCE)
        conn, src = await _accept(app)
        with probe, conn:
            assert src == PROBE_SOURCE
            await conn.send(b"ok")  # the reply to the probe is not captured either
            assert await probe.recv(8) == b"ok"
    assert not _pending(ls.inbound.socket)


async def test_excluded_ports_and_cidrs_are_not_captured(
    captured: tuple[Pair, PodListeners],
) -> None:
    pair, ls = captured
    # Outbound to an excluded port, and to an address in an excluded CIDR.
    for host, port in ((PEER_IP, 8081), (PEER_IP2, 8080)):
        server = _listen(pair.peer, host, port)
        with server:
            app = await _connect(pair.pod, (host, port))
            conn, src = await _accept(server)
            with app, conn:
                assert src == POD_IP
    assert not _pending(ls.outbound.socket)
    # Inbound to an excluded port reaches the app.
    app_listener = _listen(pair.pod, "0.0.0.0", 8082)
    with app_listener:
        peer = await _connect(pair.peer, (POD_IP, 8082))
        conn, src = await _accept(app_listener)
        with peer, conn:
            assert src == PEER_IP
    assert not _pending(ls.inbound.socket)


async def test_transparent_delivery_preserves_source_and_replies_return(
    captured: tuple[Pair, PodListeners],
) -> None:
    """The agent connects to the app with the peer's IP as source; the app's replies, addressed
    to that (non-local) IP, must come back to the agent, not leave for the real peer."""
    pair, ls = captured
    app = _listen(pair.pod, "0.0.0.0", 8080)
    real_peer = _listen(pair.peer, "0.0.0.0", 8080)
    with app, real_peer:
        agent = await _connect(
            pair.pod, (POD_IP, 8080), mark=MESH_MARK, src=PEER_IP, transparent=True
        )
        conn, src = await _accept(app)
        with agent, conn:
            assert src == PEER_IP
            await agent.send(b"request")
            assert await conn.recv(16) == b"request"
            await conn.send(b"response")
            with trio.fail_after(TIMEOUT):
                assert await agent.recv(16) == b"response"
    assert not _pending(ls.inbound.socket)


async def test_transparent_delivery_needs_the_routing(pair: Pair) -> None:
    """Control for the test above: without our rules the handshake cannot complete, because
    the app's SYN-ACK is routed out to the real peer (which answers with a reset)."""
    app = _listen(pair.pod, "0.0.0.0", 8080)
    with app:
        s = trio.socket.from_stdlib_socket(pair.pod.socket(transparent=True))
        with s:
            await s.bind((PEER_IP, 0))
            with trio.move_on_after(1):  # real time: the handshake fails on a reset or hangs
                try:
                    await s.connect((POD_IP, 8080))
                except OSError as e:
                    assert e.errno in (errno.ECONNREFUSED, errno.ECONNRESET)  # noqa: PT017
                else:
                    pytest.fail("connected without the connmark/ip rule path")


async def test_bind_listeners_is_all_or_nothing(pair: Pair) -> None:
    squatter = _listen(pair.pod, "0.0.0.0", INBOUND_PLAINTEXT_PORT)
    with squatter:
        with pytest.raises(ListenerError) as info:
            bind_listeners(pair.pod)
        assert (
            str(info.value)
            == f"bind {INBOUND_PLAINTEXT_PORT} in netns {pair.pod.name}: address in use"
        )
        assert info.value.errno == errno.EADDRINUSE
        # 15001, bound before the failure, was released again.
        _listen(pair.pod, "0.0.0.0", OUTBOUND_CAPTURE_PORT).close()
    listeners = bind_listeners(pair.pod)
    await listeners.aclose()
