"""Test helpers: two real namespaces, "pod" and "peer", joined by a veth pair (10.123.0.0/24).

Everything is created inside the test namespaces (`ip -n <ns> link add … peer … netns <peer>`),
nothing in the machine's own namespace, and both namespaces are deleted in teardown even when
the test fails. Names carry the pid and a counter so parallel runs do not collide.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodeagent.inpod import Netns

POD_IP = "10.123.0.2"
PEER_IP = "10.123.0.1"
PEER_IP2 = "10.123.0.100"  # a second peer address, for excluded-CIDR tests
PROBE_IP = "169.254.7.127"
_counter = itertools.count()


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def in_netns(name: str, *cmd: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", name, *cmd],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {name}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Pair:
    pod_name: str
    peer_name: str
    pod: Netns
    peer: Netns


@pytest.fixture
def pair() -> Iterator[Pair]:
    base = f"inpod-t{os.getpid()}-{next(_counter)}"
    pod_name, peer_name = f"{base}-pod", f"{base}-peer"
    created: list[str] = []
    handles: list[Netns] = []
    try:
        for name in (pod_name, peer_name):
            ip("netns", "add", name)
            created.append(name)
        ip("-n", pod_name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", peer_name)  # fmt: skip
        for name, addr in ((pod_name, POD_IP), (peer_name, PEER_IP)):
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", peer_name, "addr", "add", f"{PEER_IP2}/24", "dev", "eth0")
        ip("-n", peer_name, "addr", "add", f"{PROBE_IP}/32", "dev", "eth0")
        ip("-n", pod_name, "route", "add", f"{PROBE_IP}/32", "dev", "eth0")
        pod, peer = Netns.open(f"/run/netns/{pod_name}"), Netns.open(f"/run/netns/{peer_name}")
        handles += [pod, peer]
        yield Pair(pod_name, peer_name, pod, peer)
    finally:
        for h in handles:
            h.close()
        for name in created:
            subprocess.run(["ip", "netns", "del", name], timeout=10, check=False)
