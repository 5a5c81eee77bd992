"""Two agents' listeners in one pod netns (a restart): the second binds beside the first
(SO_REUSEPORT), and connections queued on the first when it closes move to the second
(net.ipv4.tcp_migrate_req) instead of being reset."""

from __future__ import annotations

import trio
from inpod_net import PEER_IP, POD_IP, Pair

from nodeagent.contract import TUNNEL_PORT
from nodeagent.inpod import bind_listeners

TIMEOUT = 5.0


async def _connect(pair: Pair) -> trio.socket.SocketType:
    s = trio.socket.from_stdlib_socket(pair.peer.socket(mark=0))
    await s.bind((PEER_IP, 0))
    with trio.fail_after(TIMEOUT):
        await s.connect((POD_IP, TUNNEL_PORT))
    return s


async def test_a_new_agent_binds_beside_the_old_and_inherits_its_queue(pair: Pair) -> None:
    old = bind_listeners(pair.pod)
    new = bind_listeners(pair.pod)  # EADDRINUSE without SO_REUSEPORT
    try:
        assert pair.pod.run(_read_migrate_req) == "1"
        # Nobody accepts yet: the kernel queues each handshake on one of the two sockets.
        clients = [await _connect(pair) for _ in range(16)]
        old.close()  # the old agent stops accepting: its queue migrates
        accepted = 0
        with trio.fail_after(TIMEOUT):
            while accepted < len(clients):
                stream = await new.tunnel.accept()
                await stream.send_all(b"x")
                await stream.aclose()
                accepted += 1
        for c in clients:
            with trio.fail_after(TIMEOUT):
                assert await c.recv(1) == b"x"  # not reset: served by the new listener
            c.close()
    finally:
        old.close()
        await new.aclose()


def _read_migrate_req() -> str:
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        return f.read().strip()
