"""Linux socket options the in-pod path needs: the original destination of a REDIRECTed
connection (SO_ORIGINAL_DST, from conntrack) and the option constants Python does not export."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from typing import Protocol

from nodeagent.inpod.errors import InpodError

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>, level SOL_IP
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)  # <linux/in.h>
IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # <linux/in.h>
_SOCKADDR_IN = struct.Struct("!HH4s8x")  # family (host order: read apart), port, addr


class _HasGetsockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def original_dst(sock: _HasGetsockopt) -> tuple[str, int]:
    """(ip, port) the client originally connected to, before REDIRECT rewrote it.

    Works on stdlib and trio sockets of accepted IPv4 TCP connections; for a connection that
    was not NATed it returns the socket's own local address (conntrack's original tuple).
    """
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    except OSError as e:
        raise InpodError(
            f"original_dst: getsockopt SO_ORIGINAL_DST: {e.strerror} "
            "(no conntrack entry: not an IPv4 TCP connection seen by netfilter?)",
            errno=e.errno,
        ) from None
    if len(raw) < _SOCKADDR_IN.size:
        raise InpodError(f"original_dst: short sockaddr ({len(raw)} bytes)")
    family = int.from_bytes(raw[:2], sys.byteorder)  # sa_family is in host byte order
    _, port, addr = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
    if family != socket.AF_INET:
        raise InpodError(f"original_dst: unexpected address family {family}")
    return str(ipaddress.IPv4Address(addr)), port
