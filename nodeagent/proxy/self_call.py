"""Refusing connections that would loop back into the agent's own listeners (issue 21, item 1).

The agent binds 15001, 15006, 15008 (and 15053) in every pod netns, and its own sockets there
bypass the capture. So a destination that IS one of those listeners makes the agent connect to
itself: a tunnel header naming port 15006, an app calling `<pod IP>:15006` or `127.0.0.1:15001`,
a node calling `<pod IP>:15006` in plaintext. Each accepted connection opens another one, and
the agent runs out of file descriptors for every pod on its node within seconds. ztunnel refuses
these (`SelfCall`, illegal ports); so does the agent, on every path, before it connects.

Pure rules, one per path; each returns the reason of a refusal, or None. The outbound decision
applies `listener_target` to where it would connect (`Refuse` with flag `self_call`); the paths
raise `connection.SelfCall` (one log line with the flag, the `istio_self_calls_refused_total`
counter, a 400 status on the tunnel).
"""

from __future__ import annotations

import ipaddress

from nodeagent.contract import POD_LISTENER_PORTS
from nodeagent.snapshot import Snapshot

FLAG = "self_call"


def _listener(address: str, port: int) -> str:
    return f"{address}:{port} is one of the agent's own listeners (a connection to itself)"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def listener_target(
    snap: Snapshot, address: str, port: int, *, source_ip: str | None = None
) -> str | None:
    """Connecting from a pod to `address:port` would reach an agent listener: a listener port on
    loopback, on the calling pod's own address (`source_ip`) or on any workload's address (the
    agent of every meshed pod listens there)."""
    if port not in POD_LISTENER_PORTS:
        return None
    if _is_loopback(address) or address == source_ip or snap.workload_by_ip(address) is not None:
        return _listener(address, port)
    return None


def unredirected(original_dst: tuple[str, int], local: tuple[str, int]) -> str | None:
    """A connection on a capture listener that netfilter did not redirect there: the client
    called the listener itself (its original destination is the listener's own address)."""
    if original_dst == local:
        return f"{_listener(*original_dst)}; the connection was not redirected"
    return None


def tunnel_target(port: int) -> str | None:
    """A tunnel header whose target port is an agent listener of the destination pod."""
    if port in POD_LISTENER_PORTS:
        return f"tunnel target port {port} is one of the agent's own listeners in the pod"
    return None


def inbound_target(original_dst: tuple[str, int]) -> str | None:
    """A plaintext inbound connection (15006) whose original destination port is one of the
    agent's listeners: delivering it would connect the agent to itself."""
    if original_dst[1] in POD_LISTENER_PORTS:
        return f"inbound: {_listener(*original_dst)}"
    return None
