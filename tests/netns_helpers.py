"""Two real network namespaces joined by a veth pair, for the root tests (inpod, tunnel, dns).

Everything is created inside the test namespaces (`ip -n <ns> link add … peer … netns <peer>`),
nothing in the machine's own namespace, and both namespaces are deleted on exit even when the
test fails. Names carry the pid and a counter so parallel runs do not collide. Routes and extra
addresses differ per suite, so callers add them inside the `with` block (still cleaned up).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from nodeagent.inpod import Netns

_counter = itertools.count()


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@contextmanager
def veth_pair(
    prefix: str, ends: tuple[tuple[str, str], tuple[str, str]]
) -> Iterator[tuple[tuple[str, str], tuple[Netns, Netns]]]:
    """Namespaces `<prefix>-t<pid>-<n>-<suffix>` for `ends` ((suffix, /24 address) each), an
    `eth0` in each joined to the other, lo and eth0 up: yields their names and open handles."""
    base = f"{prefix}-t{os.getpid()}-{next(_counter)}"
    (a_suffix, a_ip), (b_suffix, b_ip) = ends
    a_name, b_name = f"{base}-{a_suffix}", f"{base}-{b_suffix}"
    created: list[str] = []
    handles: list[Netns] = []
    try:
        for name in (a_name, b_name):
            ip("netns", "add", name)
            created.append(name)
        ip("-n", a_name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", b_name)  # fmt: skip
        for name, addr in ((a_name, a_ip), (b_name, b_ip)):
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", "eth0", "up")
        a, b = Netns.open(f"/run/netns/{a_name}"), Netns.open(f"/run/netns/{b_name}")
        handles += [a, b]
        yield (a_name, b_name), (a, b)
    finally:
        for h in handles:
            h.close()
        for name in created:
            subprocess.run(["ip", "netns", "del", name], timeout=10, check=False)
