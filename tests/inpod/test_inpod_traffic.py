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
from inpod_net import PEER_IP, PEER_IP2, POD_IP, Pair, in_netns

from nodeagent.contract import (
    DNS_CAPTURE_PORT,
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


async def _unanswered_agent_dial(pair: Pair, dst: tuple[str, int], kind: int) -> int:
    """An agent (marked) socket in the pod sends to `dst`, which never answers (the peer drops
    it), then gives up and closes, as a failed passthrough dial does: the kernel keeps an
    unreplied conntrack entry for the 4-tuple (120 s for TCP SYN_SENT, 30 s for UDP).
    Returns the source port it used."""
    s = trio.socket.from_stdlib_socket(pair.pod.socket(socket.AF_INET, kind, mark=MESH_MARK))
    with s:
        await s.bind((POD_IP, 0))
        port: int = s.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            with trio.move_on_after(0.3):
                await s.connect(dst)
                pytest.fail(f"{dst} answered: the peer should drop it")
        else:
            await s.sendto(b"query", dst)
            await trio.sleep(0.1)
    return port


async def test_an_unanswered_agent_dial_leaves_no_way_around_the_capture(
    captured: tuple[Pair, PodListeners],
) -> None:
    """The app later opening the same 4-tuple (its kernel may pick the same source port) is
    still captured. Without a conntrack zone of its own for the agent's connections, the app's
    SYN matches the agent's SYN_SENT entry as a retransmission: nat is never consulted, and the
    connection leaves the pod unproxied (the mesh bypassed, or ENETUNREACH for a VIP)."""
    pair, ls = captured
    in_netns(pair.peer_name, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8090", "-j",
             "DROP")  # fmt: skip
    port = await _unanswered_agent_dial(pair, (PEER_IP, 8090), socket.SOCK_STREAM)
    app = trio.socket.from_stdlib_socket(pair.pod.socket(mark=0))
    with app:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await app.bind((POD_IP, port))
        with trio.fail_after(TIMEOUT):  # the SYN escaped if this times out
            await app.connect((PEER_IP, 8090))
        conn, src = await _accept(ls.outbound.socket)
        with conn:
            assert src == POD_IP
            assert original_dst(conn) == (PEER_IP, 8090)
            assert conn.getpeername() == (POD_IP, port)


async def test_an_unanswered_agent_dns_query_leaves_no_way_around_the_dns_capture(
    captured: tuple[Pair, PodListeners],
) -> None:
    """The same for UDP: the agent's own DNS query must not let the app's next query from the
    same port skip the DNS proxy."""
    pair, _ = captured
    in_netns(pair.peer_name, "iptables", "-A", "INPUT", "-p", "udp", "--dport", "53", "-j",
             "DROP")  # fmt: skip
    port = await _unanswered_agent_dial(pair, (PEER_IP, 53), socket.SOCK_DGRAM)
    proxy = trio.socket.from_stdlib_socket(pair.pod.socket(socket.AF_INET, socket.SOCK_DGRAM))
    app = trio.socket.from_stdlib_socket(pair.pod.socket(socket.AF_INET, socket.SOCK_DGRAM, mark=0))
    with proxy, app:
        await proxy.bind(("127.0.0.1", DNS_CAPTURE_PORT))
        app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await app.bind((POD_IP, port))
        await app.sendto(b"query", (PEER_IP, 53))
        with trio.fail_after(TIMEOUT):
            data, src = await proxy.recvfrom(64)
        assert (data, src) == (b"query", (POD_IP, port))


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


async def test_transparent_sources_share_ports_across_destinations(
    captured: tuple[Pair, PodListeners],
) -> None:
    """Transparent connections from one peer address need a source port unique per 4-tuple,
    not per address: with 8 local ports, 6 open connections to each of two app ports all get
    one. A bind that picked the port itself would run out at the ninth (EADDRINUSE), and at
    1,000 connections/s its search through TIME_WAIT sockets cost milliseconds per bind."""
    pair, _ = captured
    in_netns(pair.pod_name, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40007")
    apps = [_listen(pair.pod, "0.0.0.0", port) for port in (8080, 8083)]
    opened: list[trio.socket.SocketType] = []
    try:
        for i in range(12):
            port = (8080, 8083)[i % 2]
            opened.append(
                await _connect(
                    pair.pod, (POD_IP, port), mark=MESH_MARK, src=PEER_IP, transparent=True
                )
            )
            conn, src = await _accept(apps[i % 2])
            opened.append(conn)
            assert src == PEER_IP
        ports = {s.getsockname()[1] for s in opened[::2]}
        assert len(ports) < 12  # some port serves both app ports
        assert all(40000 <= p <= 40007 for p in ports)
    finally:
        for s in opened + apps:
            s.close()


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
