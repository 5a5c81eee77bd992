"""Test helpers: two real namespaces, "pod" and "peer", joined by a veth pair (10.123.0.0/24).

Everything is created inside the test namespaces (`ip -n <ns> link add … peer … netns <peer>`),
nothing in the machine's own namespace, and both namespaces are deleted in teardown even when
the test fails. Names carry the pid and a counter so parallel runs do not collide.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from netns_helpers import ip, veth_pair

from nodeagent.contract import PROBE_SOURCE
from nodeagent.inpod import Netns

POD_IP = "10.123.0.2"
PEER_IP = "10.123.0.1"
PEER_IP2 = "10.123.0.100"  # a second peer address, for excluded-CIDR tests


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
    with veth_pair("inpod", (("pod", POD_IP), ("peer", PEER_IP))) as (names, (pod, peer)):
        pod_name, peer_name = names
        ip("-n", peer_name, "addr", "add", f"{PEER_IP2}/24", "dev", "eth0")
        ip("-n", peer_name, "addr", "add", f"{PROBE_SOURCE}/32", "dev", "eth0")
        ip("-n", pod_name, "route", "add", f"{PROBE_SOURCE}/32", "dev", "eth0")
        yield Pair(pod_name, peer_name, pod, peer)
