"""The DNS proxy for real: capture rules in a pod netns, the proxy bound inside it, `dig` in the
pod, a fake upstream DNS server in a "node" netns that the proxy forwards to.

Topology (all created here, deleted in teardown even on failure; nothing in the root netns):

    pod netns  eth0 10.124.0.2/24 ──veth── eth0 10.124.0.1/24  node netns
    resolver the pod asks: 10.124.0.1:53   fake upstream: 0.0.0.0:53 (UDP+TCP) in the node netns,
                                           answers 192.0.2.53 to everything and records who asked

With capture, the pod's queries land on the proxy (127.0.0.1:15053 in the pod netns): mesh names
get the VIPs, others reach the upstream *from the node netns* (source 127.0.0.1, as the proxy
forwards to 127.0.0.1:53 there, which the pod netns cannot even reach). Without capture, the same
dig reaches the upstream directly (source 10.124.0.2) and mesh names get 192.0.2.53: the control.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import trio
from dns_mesh import DB_PODS, REVIEWS_VIP, mesh_snapshot
from netns_helpers import ip, veth_pair

from nodeagent.contract import DNS_CAPTURE_PORT
from nodeagent.dns.errors import ProxyError
from nodeagent.dns.message import (
    NEED_DATA,
    RCODE_FORMERR,
    RCODE_SERVFAIL,
    TYPE_A,
    Record,
    TcpFramer,
    a_record,
    build_response,
    encode_query,
    parse_message,
    response_limit,
)
from nodeagent.dns.server import DnsProxy
from nodeagent.inpod import Netns, RedirectionSpec, apply_redirection, remove_redirection

pytestmark = pytest.mark.root

POD_IP, NODE_IP = "10.124.0.2", "10.124.0.1"
UPSTREAM_ANSWER = "192.0.2.53"


@dataclass
class Net:
    pod_name: str
    node_name: str
    pod: Netns
    node: Netns


@pytest.fixture
def net() -> Iterator[Net]:
    if shutil.which("dig") is None:
        pytest.fail("these tests need `dig` (Debian package bind9-dnsutils); run scripts/bootstrap")
    with veth_pair("dns", (("pod", POD_IP), ("node", NODE_IP))) as (names, (pod, node)):
        pod_name, node_name = names
        ip("-n", pod_name, "route", "add", "default", "via", NODE_IP)
        yield Net(pod_name, node_name, pod, node)


@dataclass
class FakeUpstream:
    """A tiny DNS server: A UPSTREAM_ANSWER for every A question; records (transport, source,
    name) of every query. `silent` receives and never answers (a dead resolver)."""

    netns: Netns
    port: int = 53
    silent: bool = False
    seen: list[tuple[str, str, str]] = field(default_factory=list)

    def _reply(self, data: bytes, tcp: bool) -> bytes:
        query = parse_message(data)
        q = query.questions[0]
        answers: tuple[Record, ...] = ()
        if q.qtype == TYPE_A:
            answers = (a_record(q.name, UPSTREAM_ANSWER, 5),)
        return build_response(query, 0, answers, max_size=response_limit(query, tcp=tcp))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        udp = trio.socket.from_stdlib_socket(self.netns.socket(socket.AF_INET, socket.SOCK_DGRAM,
                                                               mark=0))  # fmt: skip
        tcp = trio.socket.from_stdlib_socket(self.netns.socket(mark=0))
        with udp, tcp:
            await udp.bind(("0.0.0.0", self.port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await tcp.bind(("0.0.0.0", self.port))
            tcp.listen(16)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp, udp)
                nursery.start_soon(self._tcp, trio.SocketListener(tcp), nursery)
                task_status.started()

    async def _udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, addr = await sock.recvfrom(65535)
            self.seen.append(("udp", addr[0], parse_message(data).questions[0].text))
            if not self.silent:
                await sock.sendto(self._reply(data, False), addr)

    async def _tcp(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            nursery.start_soon(self._tcp_conn, stream)

    async def _tcp_conn(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        framer = TcpFramer()
        async with stream:
            while True:
                event = framer.next_event()
                if event is NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    framer.receive_data(data)
                    continue
                assert isinstance(event, bytes)
                self.seen.append(("tcp", peer, parse_message(event).questions[0].text))
                if not self.silent:
                    await stream.send_all(TcpFramer.frame(self._reply(event, True)))


async def dig(net: Net, *args: str) -> str:
    """`dig` inside the pod netns, asking the pod's resolver (the node's address)."""
    cmd = ["ip", "netns", "exec", net.pod_name, "dig", f"@{NODE_IP}", "+tries=1", "+time=3",
           *args]  # fmt: skip
    with trio.fail_after(15):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    return bytes(done.stdout).decode() + bytes(done.stderr).decode()


def short(output: str) -> list[str]:
    return sorted(line for line in output.split() if line)


@pytest.fixture
async def running(net: Net) -> AsyncIterator[tuple[Net, DnsProxy, FakeUpstream]]:
    await net.pod.arun(apply_redirection, net.pod, RedirectionSpec())
    upstream = FakeUpstream(net.node)
    snap = mesh_snapshot()
    proxy = DnsProxy(net.pod, namespace="default", snapshot=lambda: snap,
                     upstreams=["127.0.0.1:53"], upstream_netns=net.node, timeout=2.0)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        await nursery.start(proxy.run)
        yield net, proxy, upstream
        nursery.cancel_scope.cancel()
    await net.pod.arun(remove_redirection, net.pod)


async def test_mesh_names_answered_over_udp_and_tcp(
    running: tuple[Net, DnsProxy, FakeUpstream],
) -> None:
    net, proxy, upstream = running
    assert proxy.udp_address == ("127.0.0.1", DNS_CAPTURE_PORT)
    assert short(await dig(net, "+short", "reviews.default.svc.cluster.local")) == [REVIEWS_VIP]
    assert short(await dig(net, "+short", "+tcp", "reviews.default.svc.cluster.local")) == [
        REVIEWS_VIP
    ]
    # The short name with the pod's search path, as an app's resolver would send it.
    assert short(await dig(net, "+short", "+search", "+domain=default.svc.cluster.local",
                           "reviews")) == [REVIEWS_VIP]  # fmt: skip
    # Headless: the pods' IPs.
    assert short(await dig(net, "+short", "db.data.svc.cluster.local")) == sorted(DB_PODS)
    # AAAA of a mesh name: NOERROR, no answer (not NXDOMAIN: the name exists).
    out = await dig(net, "AAAA", "reviews.default.svc.cluster.local")
    assert "status: NOERROR" in out
    assert "ANSWER: 0" in out
    assert " aa " in out.split("flags:")[1].split(";")[0] + " "
    assert upstream.seen == []  # none of that left the pod
    stats = proxy.statistics()
    assert stats["answered"] == 5
    assert stats["forwarded"] == 0


async def test_other_names_are_forwarded_from_the_node_netns(
    running: tuple[Net, DnsProxy, FakeUpstream],
) -> None:
    net, proxy, upstream = running
    assert short(await dig(net, "+short", "www.example.com")) == [UPSTREAM_ANSWER]
    assert short(await dig(net, "+short", "+tcp", "www.example.com")) == [UPSTREAM_ANSWER]
    out = await dig(net, "MX", "example.com")  # not a type the mesh answers
    assert "status: NOERROR" in out
    # Source 127.0.0.1: sent from the node netns to its own loopback, not by the pod.
    assert upstream.seen == [
        ("udp", "127.0.0.1", "www.example.com"),
        ("tcp", "127.0.0.1", "www.example.com"),
        ("udp", "127.0.0.1", "example.com"),
    ]
    assert proxy.statistics()["forwarded"] == 3


async def test_upstream_refusing_or_silent_gives_servfail(net: Net) -> None:
    await net.pod.arun(apply_redirection, net.pod, RedirectionSpec())
    snap = mesh_snapshot()
    silent = FakeUpstream(net.node, port=5300, silent=True)
    # 127.0.0.1:54 has no listener (ICMP port unreachable → refused at once), then a server
    # that never answers (timeout).
    proxy = DnsProxy(net.pod, namespace="default", snapshot=lambda: snap,
                     upstreams=["127.0.0.1:54", "127.0.0.1:5300"], upstream_netns=net.node,
                     timeout=1.0)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(silent.run)
        await nursery.start(proxy.run)
        start = trio.current_time()
        out = await dig(net, "www.example.com")
        elapsed = trio.current_time() - start
        assert "status: SERVFAIL" in out
        assert 0.4 < elapsed < 3.0
        assert silent.seen == [("udp", "127.0.0.1", "www.example.com")]
        out = await dig(net, "+tcp", "www.example.com")
        assert "status: SERVFAIL" in out
        # Mesh names still work with every upstream down.
        assert short(await dig(net, "+short", "reviews.default")) == [REVIEWS_VIP]
        assert proxy.statistics()["forward_failed"] == 2
        nursery.cancel_scope.cancel()


async def test_without_capture_the_pod_reaches_its_resolver_directly(net: Net) -> None:
    await net.pod.arun(apply_redirection, net.pod, RedirectionSpec(dns_capture=False))
    snap = mesh_snapshot()
    upstream = FakeUpstream(net.node)
    proxy = DnsProxy(net.pod, namespace="default", snapshot=lambda: snap,
                     upstreams=["127.0.0.1:53"], upstream_netns=net.node)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        await nursery.start(proxy.run)
        out = await dig(net, "+short", "reviews.default.svc.cluster.local")
        assert short(out) == [UPSTREAM_ANSWER]
        assert upstream.seen == [("udp", POD_IP, "reviews.default.svc.cluster.local")]
        assert proxy.statistics()["queries"] == 0
        nursery.cancel_scope.cancel()


async def test_malformed_queries_get_formerr_and_the_proxy_survives(
    running: tuple[Net, DnsProxy, FakeUpstream],
) -> None:
    net, proxy, _ = running
    sock = trio.socket.from_stdlib_socket(net.pod.socket(socket.AF_INET, socket.SOCK_DGRAM,
                                                         mark=0))  # fmt: skip
    with sock:
        await sock.connect((NODE_IP, 53))  # captured like any app's query
        await sock.send(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01")
        with trio.fail_after(5):
            reply = parse_message(await sock.recv(65535))
        assert reply.id == 0xABCD
        assert reply.rcode == RCODE_FORMERR
        await sock.send(b"\x00\x01junk")  # no header: dropped
        await sock.send(encode_query("reviews", id=77))
        with trio.fail_after(5):
            reply = parse_message(await sock.recv(65535))
        assert reply.id == 77
        assert [r.address for r in reply.answers] == [REVIEWS_VIP]
    # A TCP client sending a broken frame is hung up on; the server keeps serving.
    tcp = trio.socket.from_stdlib_socket(net.pod.socket(mark=0))
    with tcp:
        await tcp.connect((NODE_IP, 53))
        stream = trio.SocketStream(tcp)
        await stream.send_all(b"\x00\x00")
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
    assert short(await dig(net, "+short", "+tcp", "reviews.default")) == [REVIEWS_VIP]
    assert proxy.statistics()["malformed"] == 2


async def test_bind_conflict_is_a_clear_error(net: Net) -> None:
    # A socket without SO_REUSEPORT holds the port: the agent's cannot join it.
    squatter = net.pod.socket(socket.AF_INET, socket.SOCK_DGRAM, mark=0)
    with squatter:
        squatter.bind(("127.0.0.1", DNS_CAPTURE_PORT))
        proxy = DnsProxy(net.pod, namespace="default", snapshot=mesh_snapshot, upstreams=[])
        with pytest.raises(ProxyError) as info:
            await proxy.run()
    assert str(info.value) == (
        f"bind 127.0.0.1:15053/udp in netns /run/netns/{net.pod_name}: address in use"
    )


async def test_a_second_proxy_binds_beside_a_running_one(
    running: tuple[Net, DnsProxy, FakeUpstream],
) -> None:
    """A restarted agent binds its DNS proxy while the old one still drains (SO_REUSEPORT)."""
    net, _, _ = running
    second = DnsProxy(net.pod, namespace="default", snapshot=mesh_snapshot, upstreams=[])
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        nursery.cancel_scope.cancel()


async def test_forwards_in_flight_are_bounded(net: Net) -> None:
    await net.pod.arun(apply_redirection, net.pod, RedirectionSpec())
    snap = mesh_snapshot()
    silent = FakeUpstream(net.node, silent=True)
    proxy = DnsProxy(net.pod, namespace="default", snapshot=lambda: snap,
                     upstreams=["127.0.0.1:53"], upstream_netns=net.node, timeout=1.0,
                     max_inflight=1)  # fmt: skip
    socks = [
        trio.socket.from_stdlib_socket(net.pod.socket(socket.AF_INET, socket.SOCK_DGRAM, mark=0))
        for _ in range(2)
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(silent.run)
        await nursery.start(proxy.run)
        for i, sock in enumerate(socks):
            await sock.connect((NODE_IP, 53))
            await sock.send(encode_query(f"slow{i}.example.com", id=i + 1))
            # The first is stuck upstream; the second is refused at once, long before the
            # first one's timeout.
            if i == 1:
                with trio.fail_after(0.5):
                    reply = parse_message(await sock.recv(65535))
                assert (reply.id, reply.rcode) == (2, RCODE_SERVFAIL)
        with trio.fail_after(3):
            reply = parse_message(await socks[0].recv(65535))
        assert (reply.id, reply.rcode) == (1, RCODE_SERVFAIL)
        stats = proxy.statistics()
        assert (stats["overloaded"], stats["forward_failed"], stats["inflight"]) == (1, 1, 0)
        nursery.cancel_scope.cancel()
    for sock in socks:
        sock.close()
