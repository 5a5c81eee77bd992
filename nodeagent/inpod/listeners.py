"""The agent's three capture listeners inside one pod's netns, as trio SocketListeners.

- 15001 outbound: the app's connections REDIRECTed in nat OUTPUT. REDIRECT rewrites the
  destination to 127.0.0.1 for locally generated packets, so 127.0.0.1 would do; we bind
  0.0.0.0 so the listener also accepts when the destination is the pod's own address, and the
  rules never let a peer reach it (inbound REDIRECT sends everything to 15006 instead).
- 15006 inbound plaintext: peers' connections REDIRECTed in nat PREROUTING; REDIRECT rewrites the
  destination to the primary address of the incoming interface, hence 0.0.0.0.
- 15008 tunnel: peers connect to it directly (it is not redirected), on the pod's address.

REDIRECT delivers to a local address, so none of them needs IP_TRANSPARENT (that is only for the
agent's own sockets that bind a peer's address as source, `Netns.socket(transparent=True)`).
Every socket carries the mesh mark, like everything the agent opens in a pod.

Restarts that drop nothing: every listener has SO_REUSEPORT, so a new agent binds beside a
draining old one (the kernel spreads new connections over both until the old closes its
sockets), and binding turns on `net.ipv4.tcp_migrate_req` in the pod's netns, so connections
that sit in the old socket's accept queue when it closes move to the new one instead of being
reset. Linux lets only sockets of the same effective uid share a port, so the reuse group is
the agent's (root in the pod could already rewrite the pod's rules).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

import trio

from nodeagent.contract import INBOUND_PLAINTEXT_PORT, MESH_MARK, OUTBOUND_CAPTURE_PORT, TUNNEL_PORT
from nodeagent.inpod.errors import ListenerError, NetnsError
from nodeagent.inpod.netns import Netns
from nodeagent.log import get_logger

log = get_logger("inpod")

BACKLOG = 1024
_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def _enable_request_migration() -> None:
    """Run inside the pod's netns (/proc/sys/net follows the opening thread's netns)."""
    with open(_MIGRATE_REQ, "w") as f:
        f.write("1")


def enable_request_migration(netns: Netns) -> bool:
    """Let a closing listener's queued connections migrate to another listener of its
    SO_REUSEPORT group in `netns` (Linux >= 5.14) instead of being reset.

    False where /proc/sys is read-only (a container runtime's default, as for the DaemonSet's
    unprivileged agent): the pod is still served; only connections still queued, not accepted,
    when an agent hands over to its successor are reset then (docs/dataplane.md, Restarts)."""
    try:
        netns.run(_enable_request_migration)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            log.warning("listeners.no_request_migration", netns=netns.name, error=e.strerror)
            return False
        raise ListenerError(
            f"set net.ipv4.tcp_migrate_req in netns {netns.name}: {e.strerror}", errno=e.errno
        ) from None
    return True


@dataclass
class PodListeners:
    """The bound, listening sockets of one pod; `aclose()` them (or `close()` from trio)."""

    netns: Netns
    outbound: trio.SocketListener
    inbound: trio.SocketListener
    tunnel: trio.SocketListener

    def all(self) -> tuple[trio.SocketListener, ...]:
        return (self.outbound, self.inbound, self.tunnel)

    def close(self) -> None:
        for listener in self.all():
            listener.socket.close()

    async def aclose(self) -> None:
        for listener in self.all():
            await listener.aclose()


def _strerror(code: int | None) -> str:
    if code == errno.EADDRINUSE:
        return "address in use"
    return os.strerror(code) if code else "unknown error"


def listen_beside(sock: socket.socket, host: str, port: int) -> None:
    """Bind and listen so that a restarted agent can re-bind while old connections sit in
    TIME_WAIT, and beside the agent it replaces while that one still drains (SO_REUSEPORT:
    module docstring). The pods' listeners and the gateway's (node netns) bind this way."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)


def _listen(netns: Netns, port: int, host: str, mark: int) -> socket.socket:
    try:
        sock = netns.socket(socket.AF_INET, socket.SOCK_STREAM, mark=mark)
    except NetnsError as e:
        raise ListenerError(f"bind {port} in netns {netns.name}: {e}", errno=e.errno) from None
    try:
        listen_beside(sock, host, port)
    except OSError as e:
        sock.close()
        raise ListenerError(
            f"bind {port} in netns {netns.name}: {_strerror(e.errno)}", errno=e.errno
        ) from None
    return sock


def bind_listeners(
    netns: Netns,
    *,
    host: str = "0.0.0.0",
    mark: int = MESH_MARK,
    ports: tuple[int, int, int] = (OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_PORT, TUNNEL_PORT),
) -> PodListeners:
    """Bind outbound, inbound and tunnel listeners in `netns`; all three or none.

    Does not block (bind/listen only); call it from the trio thread. `ports` exists for tests.
    """
    enable_request_migration(netns)
    socks: list[socket.socket] = []
    try:
        for port in ports:
            socks.append(_listen(netns, port, host, mark))
    except BaseException:
        for s in socks:
            s.close()
        raise
    out, inb, tun = (trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks)
    return PodListeners(netns=netns, outbound=out, inbound=inb, tunnel=tun)
