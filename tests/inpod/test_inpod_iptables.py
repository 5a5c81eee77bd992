"""Applying, checking, repairing and removing the rule set and the policy routing in a real netns.

What is live is read with the real tools (`iptables-legacy-save`, `ip rule`, `ip route`), not
only through our own read-back, so a bug shared by apply and read_back cannot hide.
"""

from __future__ import annotations

import pytest
from inpod_net import Pair, in_netns, ip

from nodeagent.inpod import (
    RedirectionError,
    RedirectionSpec,
    apply_redirection,
    build_rules,
    check_redirection,
    iptables,
    remove_redirection,
)
from nodeagent.inpod.rules import Rule, RuleSet

pytestmark = pytest.mark.root
SPEC = RedirectionSpec.from_annotations(
    {
        "traffic.sidecar.istio.io/excludeOutboundPorts": "9090,80",
        "traffic.sidecar.istio.io/excludeInboundPorts": "8082",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12,192.168.1.5/32",
    }
)


def live_tables(netns_name: str) -> dict[str, list[str]]:
    """iptables-legacy-save per table, without comments, COMMIT and built-in chain headers."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in in_netns(netns_name, "iptables-legacy-save").splitlines():
        if line.startswith("*"):
            current = line[1:]
            out[current] = []
        elif line.startswith("#") or line == "COMMIT" or not line:
            continue
        elif line.startswith(":") and not line.startswith(":MESH_"):
            continue  # a built-in chain's policy line
        else:
            out[current].append(line)
    return out


def expected_tables(spec: RedirectionSpec) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in build_rules(spec).render().splitlines():
        if line.startswith("*"):
            current = line[1:]
            out[current] = []
        elif line != "COMMIT":
            out[current].append(line)
    return out


def mesh_leftovers(netns_name: str) -> list[str]:
    saved = in_netns(netns_name, "iptables-legacy-save")
    left = [line for line in saved.splitlines() if "MESH_" in line]
    left += [r for r in ip("-n", netns_name, "rule").splitlines() if "lookup 100" in r]
    routes = ip("-n", netns_name, "route", "show", "table", "all").splitlines()
    left += [r for r in routes if "table 100" in r]
    return left


def test_apply_shows_exactly_the_expected_chains(pair: Pair) -> None:
    apply_redirection(pair.pod, SPEC)
    live = live_tables(pair.pod_name)
    for table, lines in expected_tables(SPEC).items():
        assert live[table] == lines, table
    assert all(not lines for t, lines in live.items() if t not in ("raw", "nat", "mangle"))
    assert "fwmark 0x111/0xfff lookup 100" in ip("-n", pair.pod_name, "rule")
    routes = ip("-n", pair.pod_name, "route", "show", "table", "100").splitlines()
    assert [r.split(" proto")[0] for r in routes] == ["local default dev lo"]
    assert check_redirection(pair.pod, SPEC) == []
    # Our read-back agrees with iptables-legacy-save.
    assert pair.pod.run(iptables.read_back).render() == build_rules(SPEC).render()
    # Nothing leaked into the peer namespace.
    assert mesh_leftovers(pair.peer_name) == []


def test_apply_twice_keeps_one_copy(pair: Pair) -> None:
    apply_redirection(pair.pod, SPEC)
    apply_redirection(pair.pod, SPEC)
    live = live_tables(pair.pod_name)
    for table, lines in expected_tables(SPEC).items():
        assert live[table] == lines
    assert ip("-n", pair.pod_name, "rule").count("lookup 100") == 1
    assert check_redirection(pair.pod, SPEC) == []


def test_reapply_with_another_spec_replaces_the_rules(pair: Pair) -> None:
    apply_redirection(pair.pod, SPEC)
    apply_redirection(pair.pod, RedirectionSpec())
    assert live_tables(pair.pod_name)["nat"] == expected_tables(RedirectionSpec())["nat"]
    assert check_redirection(pair.pod, RedirectionSpec()) == []
    assert check_redirection(pair.pod, SPEC) != []


def test_remove_leaves_nothing_and_is_idempotent(pair: Pair) -> None:
    remove_redirection(pair.pod)  # absent: a no-op
    apply_redirection(pair.pod, SPEC)
    # Besides the rules: five chain declarations (raw 1, mangle 2, nat 2), the ip rule, the route.
    assert len(mesh_leftovers(pair.pod_name)) == build_rules(SPEC).rule_count() + 5 + 2
    remove_redirection(pair.pod)
    assert mesh_leftovers(pair.pod_name) == []
    remove_redirection(pair.pod)
    assert mesh_leftovers(pair.pod_name) == []


def test_check_detects_damage_and_apply_repairs_it(pair: Pair) -> None:
    apply_redirection(pair.pod, SPEC)
    n = pair.pod_name
    in_netns(n, "iptables-legacy", "-t", "nat", "-D", "MESH_OUTPUT", "-p", "tcp", "-m", "tcp",
             "--dport", "80", "-j", "RETURN")  # fmt: skip
    in_netns(n, "iptables-legacy", "-t", "mangle", "-D", "OUTPUT", "-j", "MESH_OUTPUT")
    in_netns(n, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-j", "MESH_OUTPUT")  # duplicate
    ip("-n", n, "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100")
    problems = check_redirection(pair.pod, SPEC)
    assert problems == [
        "missing jump: -t mangle -A OUTPUT -j MESH_OUTPUT",
        "duplicate jump (2x): -t nat -A OUTPUT -j MESH_OUTPUT",
        "missing rule: -t nat -A MESH_OUTPUT -p tcp -m tcp --dport 80 -j RETURN",
        "missing ip rule: fwmark 0x111/0xfff lookup 100 priority 32764",
    ]
    apply_redirection(pair.pod, SPEC)
    assert check_redirection(pair.pod, SPEC) == []
    live = live_tables(n)
    for table, lines in expected_tables(SPEC).items():
        assert live[table] == lines


def test_other_rules_in_builtin_chains_are_left_alone(pair: Pair) -> None:
    n = pair.pod_name
    in_netns(n, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
    apply_redirection(pair.pod, SPEC)
    remove_redirection(pair.pod)
    assert live_tables(n)["nat"] == ["-A OUTPUT -p udp -j RETURN"]


def test_failed_apply_changes_nothing(pair: Pair) -> None:
    apply_redirection(pair.pod, SPEC)
    before = in_netns(pair.pod_name, "iptables-legacy-save", "-t", "nat")
    good = build_rules(RedirectionSpec())
    bad_rule = Rule("nat", "MESH_OUTPUT", ("-p", "tcp", "-j", "NO_SUCH_TARGET"))
    chains = dict(good.chains)
    chains[("nat", "MESH_OUTPUT")] += (bad_rule,)
    with pytest.raises(RedirectionError) as info:
        pair.pod.run(
            lambda: iptables.apply_rules(
                RuleSet(chains=chains, jumps=good.jumps), where=pair.pod_name
            )
        )
    assert f"apply iptables rules in netns {pair.pod_name}: nat:" in str(info.value)

    def strip(save: str) -> list[str]:
        return [line for line in save.splitlines() if not line.startswith("#")]

    assert strip(in_netns(pair.pod_name, "iptables-legacy-save", "-t", "nat")) == strip(before)
    assert check_redirection(pair.pod, SPEC) == []


def test_edit_table_commits_once_or_not_at_all(pair: Pair) -> None:
    def good() -> None:
        with iptables.edit_table("nat", what="test edit") as table:
            table.create_or_flush_chain("MESH_TEST")
            table.append_rule("MESH_TEST", ("-p", "tcp", "-j", "RETURN"))
            table.insert_rule("OUTPUT", ("-j", "MESH_TEST"))

    def bad() -> None:
        with iptables.edit_table("nat", what="test edit") as table:
            table.create_or_flush_chain("MESH_TEST")  # staged, then the bad rule aborts it all
            table.append_rule("OUTPUT", ("-p", "tcp", "--no-such-option"))

    def read() -> tuple[list[tuple[str, ...]], list[int]]:
        with iptables.read_table("nat", what="test read") as table:
            return table.rules("MESH_TEST"), table.jump_positions("OUTPUT", "MESH_TEST")

    pair.pod.run(good)
    assert pair.pod.run(read) == ([("-p", "tcp", "-j", "RETURN")], [0])
    with pytest.raises(RedirectionError, match="test edit in netns current: cannot translate"):
        pair.pod.run(bad)
    assert pair.pod.run(read) == ([("-p", "tcp", "-j", "RETURN")], [0])
    assert "-A OUTPUT -j MESH_TEST" in live_tables(pair.pod_name)["nat"]
