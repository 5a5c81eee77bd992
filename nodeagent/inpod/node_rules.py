"""Node-side probe SNAT: kubelet probes reach enrolled pods from 169.254.7.127 (Istio's value).

A kubelet probe is a TCP connection opened in the NODE's network namespace to a pod IP. Without
help the pod's inbound rule would capture it to 15006, and a STRICT PeerAuthentication refuses
plaintext there. As Istio ambient does (istio-cni `CreateHostRulesForHealthChecks`), the agent
SNATs locally generated TCP to enrolled pods to 169.254.7.127 in nat POSTROUTING of the node
netns; the in-pod rules let that source through both ways (docs/redirection.md).

    *nat
    -A POSTROUTING -j MESH_POSTRT                (first rule: a later MASQUERADE must not win)
    -A MESH_POSTRT -p tcp -m tcp --dport 15008 -j RETURN      (the agent's own HBONE dials)
    -A MESH_POSTRT -m mark --mark 0x539/0xfff -j RETURN       (any socket the agent marked)
    -A MESH_POSTRT -d <pod IP>/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127

Pod IPs: one rule per enrolled pod address. Istio matches an ipset; python-iptables has no
ipset support, and a pod CIDR would also SNAT the node's connections to opted-out pods and to
pods of other nodes routed through this one, so exact addresses it is. `-m owner
--socket-exists` keeps forwarded traffic (no local socket) out. The chain is rebuilt whole on
every change (one atomic commit of the nat table), so an update never leaves a gap.

Only `MESH_POSTRT` and the POSTROUTING jumps to it are ever touched here: the node netns may hold
other software's rules. Functions block (libiptc) and act on the calling thread's netns; from
trio use the `a*` variants.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import trio

from nodeagent.contract import MARK_MASK, MESH_MARK, PROBE_SOURCE, TUNNEL_PORT
from nodeagent.inpod.errors import RedirectionError
from nodeagent.inpod.iptables import edit_table, read_table
from nodeagent.inpod.rules import Rule, RuleSet, diff_rules

CHAIN_POSTROUTING = "MESH_POSTRT"
TABLE = "nat"
BUILTIN = "POSTROUTING"
MAX_POD_IPS = 4096  # one rule each; a node with more pods than this is a configuration mistake

_JUMP = Rule(TABLE, BUILTIN, ("-j", CHAIN_POSTROUTING))


def _check_ips(pod_ips: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for raw in pod_ips:
        try:
            addr = ipaddress.IPv4Address(raw)
        except (ipaddress.AddressValueError, ValueError):
            raise RedirectionError(
                f"probe SNAT: pod address {raw!r} is not an IPv4 address"
            ) from None
        if addr.is_unspecified or addr.is_loopback or str(addr) == PROBE_SOURCE:
            raise RedirectionError(f"probe SNAT: pod address {raw!r} cannot be a pod's address")
        out.add(str(addr))
    if len(out) > MAX_POD_IPS:
        raise RedirectionError(f"probe SNAT: {len(out)} pod addresses, at most {MAX_POD_IPS}")
    return sorted(out, key=lambda a: ipaddress.IPv4Address(a))


def is_probe_target(address: str) -> bool:
    """Whether `build_probe_rules` accepts `address` (callers filter data they do not control)."""
    try:
        _check_ips([address])
    except RedirectionError:
        return False
    return True


def build_probe_rules(pod_ips: Iterable[str]) -> RuleSet:
    """The desired node-side rules for these pod addresses (pure; rejects bad addresses)."""
    rules = [
        Rule(TABLE, CHAIN_POSTROUTING, ("-p", "tcp", "-m", "tcp", "--dport", str(TUNNEL_PORT),
                                         "-j", "RETURN")),
        Rule(TABLE, CHAIN_POSTROUTING, ("-m", "mark", "--mark", f"{MESH_MARK:#x}/{MARK_MASK:#x}",
                                         "-j", "RETURN")),
    ]  # fmt: skip
    for ip in _check_ips(pod_ips):
        spec = ("-d", f"{ip}/32", "-p", "tcp", "-m", "owner", "--socket-exists",
                "-j", "SNAT", "--to-source", PROBE_SOURCE)  # fmt: skip
        rules.append(Rule(TABLE, CHAIN_POSTROUTING, spec))
    return RuleSet(chains={(TABLE, CHAIN_POSTROUTING): tuple(rules)}, jumps=(_JUMP,))


def apply_probe_rules(pod_ips: Iterable[str], *, where: str = "current") -> RuleSet:
    """Make MESH_POSTRT hold exactly the rules for `pod_ips`, with one jump first in
    POSTROUTING; idempotent and repairing, one atomic commit. Returns what it installed."""
    ruleset = build_probe_rules(pod_ips)  # validate before touching anything
    what = f"probe SNAT: apply {TABLE}/{CHAIN_POSTROUTING}"
    with edit_table(TABLE, what=what, where=where) as table:
        positions = table.jump_positions(BUILTIN, CHAIN_POSTROUTING)
        keep_first = positions[:1] == [0]
        table.delete_rules(BUILTIN, positions[1:] if keep_first else positions)
        table.create_or_flush_chain(CHAIN_POSTROUTING)
        for rule in ruleset.chains[(TABLE, CHAIN_POSTROUTING)]:
            table.append_rule(CHAIN_POSTROUTING, rule.spec)
        if not keep_first:
            table.insert_rule(BUILTIN, _JUMP.spec)
    return ruleset


def remove_probe_rules(*, where: str = "current") -> bool:
    """Delete the POSTROUTING jumps to MESH_POSTRT and the chain; False when nothing was there."""
    what = f"probe SNAT: remove {TABLE}/{CHAIN_POSTROUTING}"
    with read_table(TABLE, what=what, where=where) as table:
        present = bool(table.jump_positions(BUILTIN, CHAIN_POSTROUTING)) or table.has_chain(
            CHAIN_POSTROUTING
        )
    if not present:
        return False
    with edit_table(TABLE, what=what, where=where) as table:
        table.delete_rules(BUILTIN, table.jump_positions(BUILTIN, CHAIN_POSTROUTING))
        if table.has_chain(CHAIN_POSTROUTING):
            table.delete_chain(CHAIN_POSTROUTING)
    return True


def _read(where: str) -> tuple[RuleSet, list[int]]:
    """The live MESH_POSTRT chain and POSTROUTING jumps to it, and the jumps' positions."""
    what = f"probe SNAT: read {TABLE}/{CHAIN_POSTROUTING}"
    with read_table(TABLE, what=what, where=where) as table:
        positions = table.jump_positions(BUILTIN, CHAIN_POSTROUTING)
        builtin = table.rules(BUILTIN)
        jumps = tuple(Rule(TABLE, BUILTIN, builtin[pos]) for pos in positions)
        chains: dict[tuple[str, str], tuple[Rule, ...]] = {}
        if table.has_chain(CHAIN_POSTROUTING):
            chains[(TABLE, CHAIN_POSTROUTING)] = tuple(
                Rule(TABLE, CHAIN_POSTROUTING, toks) for toks in table.rules(CHAIN_POSTROUTING)
            )
    return RuleSet(chains=chains, jumps=jumps), positions


def read_probe_rules(*, where: str = "current") -> RuleSet:
    """The live MESH_POSTRT chain and the POSTROUTING jumps to it (empty when absent)."""
    return _read(where)[0]


def check_probe_rules(pod_ips: Iterable[str], *, where: str = "current") -> list[str]:
    """What differs between the rules `pod_ips` need and the live ones ([] = all good),
    including a jump that is no longer the first rule of POSTROUTING."""
    expected = build_probe_rules(pod_ips)
    live, positions = _read(where)
    problems = diff_rules(expected, live)
    if positions and positions[0] != 0:
        problems.append(f"jump to {CHAIN_POSTROUTING} is rule {positions[0]} of {BUILTIN}, not 0")
    return problems


async def aapply_probe_rules(pod_ips: Iterable[str]) -> RuleSet:
    ips = list(pod_ips)
    return await trio.to_thread.run_sync(lambda: apply_probe_rules(ips))


async def aremove_probe_rules() -> bool:
    return await trio.to_thread.run_sync(lambda: remove_probe_rules())
