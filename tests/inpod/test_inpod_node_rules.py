"""Node-side probe SNAT: pure rule building, and real rules + real traffic in test namespaces.

In the root tests the "peer" namespace of `pair` plays the node and "pod" the pod: a connection
the node opens to the pod IP must arrive from 169.254.7.127, while the agent's own (marked, or to
15008) connections keep the node's address. Live rules are also read with iptables-legacy-save.
"""

from __future__ import annotations

import socket

import pytest
from inpod_net import PEER_IP, POD_IP, Pair, in_netns

from nodeagent.contract import MESH_MARK, PROBE_SOURCE
from nodeagent.inpod import RedirectionError
from nodeagent.inpod.node_rules import (
    CHAIN_POSTROUTING,
    apply_probe_rules,
    build_probe_rules,
    check_probe_rules,
    is_probe_target,
    read_probe_rules,
    remove_probe_rules,
)


def test_build_renders_istio_like_rules() -> None:
    text = build_probe_rules(["10.201.2.3", "10.201.2.2", "10.201.2.3"]).render()
    assert text == (
        "*nat\n"
        ":MESH_POSTRT - [0:0]\n"
        "-A POSTROUTING -j MESH_POSTRT\n"
        "-A MESH_POSTRT -p tcp -m tcp --dport 15008 -j RETURN\n"
        "-A MESH_POSTRT -m mark --mark 0x539/0xfff -j RETURN\n"
        "-A MESH_POSTRT -d 10.201.2.2/32 -p tcp -m owner --socket-exists"
        " -j SNAT --to-source 169.254.7.127\n"
        "-A MESH_POSTRT -d 10.201.2.3/32 -p tcp -m owner --socket-exists"
        " -j SNAT --to-source 169.254.7.127\n"
        "COMMIT\n"
    )


def test_build_without_pods_keeps_chain_and_bypasses() -> None:
    rs = build_probe_rules([])
    assert rs.rule_count() == 3
    assert all(r.target == "RETURN" for r in rs.chains[("nat", CHAIN_POSTROUTING)])


@pytest.mark.parametrize("bad", ["10.0.0", "fd00::1", "0.0.0.0", "127.0.0.1", "169.254.7.127", ""])
def test_build_rejects_bad_addresses(bad: str) -> None:
    with pytest.raises(RedirectionError, match="probe SNAT: pod address"):
        build_probe_rules(["10.0.0.1", bad])
    assert not is_probe_target(bad)
    assert is_probe_target("10.0.0.1")


def _serve_once(pair: Pair, port: int) -> socket.socket:
    srv = pair.pod.socket(socket.AF_INET, socket.SOCK_STREAM, mark=0)
    srv.setblocking(True)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((POD_IP, port))
    srv.listen(4)
    srv.settimeout(5)
    return srv


def _seen_source(pair: Pair, port: int, *, mark: int) -> str:
    """Connect from the node (peer) netns to the pod; the source address the pod sees."""
    srv = _serve_once(pair, port)
    cli = pair.peer.socket(socket.AF_INET, socket.SOCK_STREAM, mark=mark)
    try:
        cli.setblocking(True)
        cli.settimeout(5)
        cli.connect((POD_IP, port))
        conn, (src, _) = srv.accept()
        conn.close()
        return str(src)
    finally:
        cli.close()
        srv.close()


@pytest.mark.root
def test_probe_snat_real_traffic_and_exclusions(pair: Pair) -> None:
    assert _seen_source(pair, 8080, mark=0) == PEER_IP  # control: nothing installed yet
    pair.peer.run(lambda: apply_probe_rules([POD_IP]))
    assert _seen_source(pair, 8080, mark=0) == PROBE_SOURCE
    assert _seen_source(pair, 8081, mark=MESH_MARK) == PEER_IP  # the agent's marked sockets
    assert _seen_source(pair, 15008, mark=0) == PEER_IP  # HBONE dials to pods
    pair.peer.run(lambda: remove_probe_rules())
    assert _seen_source(pair, 8082, mark=0) == PEER_IP


@pytest.mark.root
def test_apply_is_idempotent_repairs_and_removes_cleanly(pair: Pair) -> None:
    node = pair.peer
    in_netns(
        pair.peer_name,
        "iptables-legacy",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "eth0",
        "-j",
        "MASQUERADE",
    )  # fmt: skip  (someone else's rule)
    for _ in range(2):
        node.run(lambda: apply_probe_rules([POD_IP, "10.123.0.9"]))
    assert node.run(lambda: check_probe_rules([POD_IP, "10.123.0.9"])) == []
    live = in_netns(pair.peer_name, "iptables-legacy-save", "-t", "nat")
    lines = [ln for ln in live.splitlines() if ln.startswith("-A")]
    assert lines[0] == "-A POSTROUTING -j MESH_POSTRT"  # first, before the MASQUERADE
    assert lines.count("-A POSTROUTING -j MESH_POSTRT") == 1
    expected = build_probe_rules([POD_IP, "10.123.0.9"])
    assert node.run(lambda: read_probe_rules()) == expected

    # Drift: a duplicate jump and a stray rule are reported, then repaired by applying again.
    in_netns(pair.peer_name, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j",
             CHAIN_POSTROUTING)  # fmt: skip
    in_netns(pair.peer_name, "iptables-legacy", "-t", "nat", "-A", CHAIN_POSTROUTING, "-j",
             "RETURN")  # fmt: skip
    problems = node.run(lambda: check_probe_rules([POD_IP, "10.123.0.9"]))
    assert any("duplicate jump" in p for p in problems)
    assert any("unexpected rule" in p for p in problems)
    # A pod left: its rule goes with the next apply.
    node.run(lambda: apply_probe_rules([POD_IP]))
    assert node.run(lambda: check_probe_rules([POD_IP])) == []
    assert "10.123.0.9" not in in_netns(pair.peer_name, "iptables-legacy-save", "-t", "nat")

    assert node.run(lambda: remove_probe_rules()) is True
    assert node.run(lambda: remove_probe_rules()) is False
    after = in_netns(pair.peer_name, "iptables-legacy-save", "-t", "nat")
    assert "MESH_POSTRT" not in after
    assert "-A POSTROUTING -o eth0 -j MASQUERADE" in after  # other software's rule untouched
    assert any("missing chain" in p for p in node.run(lambda: check_probe_rules([POD_IP])))


@pytest.mark.root
def test_bad_address_changes_nothing(pair: Pair) -> None:
    pair.peer.run(lambda: apply_probe_rules([POD_IP]))
    before = in_netns(pair.peer_name, "iptables-legacy-save", "-t", "nat")
    with pytest.raises(RedirectionError, match="not an IPv4 address"):
        pair.peer.run(lambda: apply_probe_rules([POD_IP, "nope"]))
    after = in_netns(pair.peer_name, "iptables-legacy-save", "-t", "nat")
    strip = [ln for ln in after.splitlines() if not ln.startswith("#")]
    assert strip == [ln for ln in before.splitlines() if not ln.startswith("#")]
