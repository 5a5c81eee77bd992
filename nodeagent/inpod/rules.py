"""The in-pod redirection rule set as plain data: what to install, decided without the kernel.

`RedirectionSpec` is what a pod asks for (Istio's `traffic.sidecar.istio.io/*` annotations);
`build_rules(spec)` turns it into a `RuleSet`: owned chains (prefix `MESH_`), the jumps into them
from the built-in chains, and the rules of each owned chain, every rule spelled exactly as
`iptables-save` prints it, so the same text serves the golden tests, the live read-back
(`iptables.read_back`) and `diff_rules`, which names what is missing, extra or out of order.

The content follows Istio ambient's in-pod REDIRECT mode (cni/pkg/iptables `AppendInpodRules`);
see docs/redirection.md for the why of each rule. Bypasses use `-j RETURN`: they leave our chain
only, so rules other software put after our jump in the built-in chain still run.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nodeagent.contract import (
    DNS_CAPTURE_PORT,
    INBOUND_PLAINTEXT_PORT,
    MARK_MASK,
    MESH_MARK,
    OUTBOUND_CAPTURE_PORT,
    PROBE_SOURCE,
    TUNNEL_PORT,
)
from nodeagent.inpod.errors import AnnotationError

DNS_PORT = 53

# Connmark put on connections the agent delivers transparently (source = a peer's IP) so the
# app's replies, which are addressed to that non-local peer IP, are routed back to the agent.
# Istio's value: a mesh without Istio never sees Istio's, and one with it agrees with it.
CONNMARK = 0x111
# `ip rule fwmark CONNMARK/MARK_MASK lookup ROUTE_TABLE priority RULE_PRIORITY` and
# `ip route add local 0.0.0.0/0 dev lo table ROUTE_TABLE` (routing.py).
ROUTE_TABLE = 100
RULE_PRIORITY = 32764
# The conntrack zone of the agent's own connections' original direction (`CT --zone-orig`, raw
# MESH_OUTPUT). The app's packets, in the default zone, never match them: see build_rules.
AGENT_CT_ZONE = 1
CHAIN_PREROUTING = "MESH_PRERT"
CHAIN_OUTPUT = "MESH_OUTPUT"
_HOOK_OF = {CHAIN_PREROUTING: "PREROUTING", CHAIN_OUTPUT: "OUTPUT"}
TABLES = ("raw", "mangle", "nat")  # the order tables are applied and rendered in

ANNOTATION_PREFIX = "traffic.sidecar.istio.io/"
A_EXCLUDE_OUTBOUND_PORTS = ANNOTATION_PREFIX + "excludeOutboundPorts"
A_EXCLUDE_INBOUND_PORTS = ANNOTATION_PREFIX + "excludeInboundPorts"
A_EXCLUDE_OUTBOUND_CIDRS = ANNOTATION_PREFIX + "excludeOutboundIPRanges"
A_INCLUDE_INBOUND_PORTS = ANNOTATION_PREFIX + "includeInboundPorts"
SUPPORTED_ANNOTATIONS = (
    A_EXCLUDE_OUTBOUND_PORTS,
    A_EXCLUDE_INBOUND_PORTS,
    A_EXCLUDE_OUTBOUND_CIDRS,
    A_INCLUDE_INBOUND_PORTS,
)
# Istio ambient's per-pod switch for DNS capture ("true"/"false"; absent: the default, on).
A_DNS_CAPTURE = "ambient.istio.io/dns-capture"
_MAX_ANNOTATION_LEN = 4096  # a pod annotation longer than this is a mistake, not a port list
_MAX_ITEMS = 256  # one iptables rule per item: keep the chains short enough to read

_MARK = f"{MESH_MARK:#x}/{MARK_MASK:#x}"
_CONNMARK = f"{CONNMARK:#x}/{MARK_MASK:#x}"
_LOOPBACK = "127.0.0.1/32"
_PROBE = f"{PROBE_SOURCE}/32"


@dataclass(frozen=True)
class RedirectionSpec:
    """What one pod wants captured. Defaults capture all TCP both ways, and DNS (UDP+TCP 53)."""

    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None  # None: all ports; (): none
    # UDP and TCP to port 53 → the DNS proxy on 15053 (Istio ambient's default since 1.25).
    dns_capture: bool = True

    def __post_init__(self) -> None:
        # Normalise so that equal specs build identical (golden-comparable) rule sets.
        object.__setattr__(self, "exclude_outbound_ports", _ports(self.exclude_outbound_ports))
        object.__setattr__(self, "exclude_inbound_ports", _ports(self.exclude_inbound_ports))
        cidrs = tuple(sorted(set(self.exclude_outbound_cidrs)))
        for c in cidrs:
            if not isinstance(c, ipaddress.IPv4Network):
                raise TypeError(f"exclude_outbound_cidrs: {c!r} is not an IPv4Network")
        object.__setattr__(self, "exclude_outbound_cidrs", cidrs)
        if self.include_inbound_ports is not None:
            included = _ports(self.include_inbound_ports)
            if TUNNEL_PORT in included:
                raise ValueError(f"include_inbound_ports: {TUNNEL_PORT} is the mesh tunnel port")
            object.__setattr__(self, "include_inbound_ports", included)
        if not isinstance(self.dns_capture, bool):
            raise TypeError(f"dns_capture: {self.dns_capture!r} is not a bool")

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> RedirectionSpec:
        """Read Istio's redirection annotations; other annotations are not ours and are ignored.

        A `traffic.sidecar.istio.io/` annotation this mesh does not implement is rejected by
        name rather than silently ignored: the pod would otherwise be captured differently
        from what its author asked for.
        """
        for key in annotations:
            if key.startswith(ANNOTATION_PREFIX) and key not in SUPPORTED_ANNOTATIONS:
                raise AnnotationError(
                    key,
                    annotations[key],
                    f"not supported by this mesh (supported: {', '.join(SUPPORTED_ANNOTATIONS)})",
                )
        include_raw = annotations.get(A_INCLUDE_INBOUND_PORTS)
        include: tuple[int, ...] | None = None
        if include_raw is not None and include_raw.strip() != "*":
            include = _parse_ports(A_INCLUDE_INBOUND_PORTS, include_raw)
            if TUNNEL_PORT in include:
                raise AnnotationError(
                    A_INCLUDE_INBOUND_PORTS, include_raw, f"{TUNNEL_PORT} is the mesh tunnel port"
                )
        return cls(
            exclude_outbound_ports=_parse_ports(
                A_EXCLUDE_OUTBOUND_PORTS, annotations.get(A_EXCLUDE_OUTBOUND_PORTS, "")
            ),
            exclude_inbound_ports=_parse_ports(
                A_EXCLUDE_INBOUND_PORTS, annotations.get(A_EXCLUDE_INBOUND_PORTS, "")
            ),
            exclude_outbound_cidrs=_parse_cidrs(
                A_EXCLUDE_OUTBOUND_CIDRS, annotations.get(A_EXCLUDE_OUTBOUND_CIDRS, "")
            ),
            include_inbound_ports=include,
            dns_capture=_parse_bool(A_DNS_CAPTURE, annotations.get(A_DNS_CAPTURE, "true")),
        )


def _parse_bool(annotation: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise AnnotationError(annotation, raw[:64], "expected 'true' or 'false'")
    return value == "true"


def _ports(ports: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted(set(ports)))
    for p in out:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ValueError(f"{p!r} is not a TCP port (1-65535)")
    return out


def _items(annotation: str, raw: str) -> list[str]:
    if len(raw) > _MAX_ANNOTATION_LEN:
        raise AnnotationError(annotation, raw[:64] + "…", f"longer than {_MAX_ANNOTATION_LEN}")
    items = [item.strip() for item in raw.split(",")]
    items = [item for item in items if item]
    if len(items) > _MAX_ITEMS:
        raise AnnotationError(annotation, raw[:64] + "…", f"more than {_MAX_ITEMS} entries")
    return items


def _parse_ports(annotation: str, raw: str) -> tuple[int, ...]:
    ports = []
    for item in _items(annotation, raw):
        # isdecimal, not int(): int() also takes "+80", " 80", "8_0" and non-ASCII digits.
        if not (item.isascii() and item.isdecimal()) or not 1 <= int(item) <= 65535:
            raise AnnotationError(annotation, raw, f"{item!r} is not a TCP port (1-65535)")
        ports.append(int(item))
    return _ports(ports)


def _parse_cidrs(annotation: str, raw: str) -> tuple[ipaddress.IPv4Network, ...]:
    cidrs = []
    for item in _items(annotation, raw):
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as e:
            raise AnnotationError(annotation, raw, f"{item!r} is not a CIDR: {e}") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise AnnotationError(
                annotation, raw, f"{item!r}: IPv6 ranges are not supported (IPv4-only capture)"
            )
        cidrs.append(net)
    return tuple(sorted(set(cidrs)))


@dataclass(frozen=True, order=True)
class Rule:
    """One rule, `iptables -t <table> -A <chain> <spec…>`, spec as iptables-save prints it."""

    table: str
    chain: str
    spec: tuple[str, ...]

    def render(self) -> str:
        return f"-A {self.chain} {' '.join(self.spec)}"

    def __str__(self) -> str:
        return f"-t {self.table} {self.render()}"

    @property
    def target(self) -> str:
        """The name after `-j` (the jump target, or REDIRECT/CONNMARK/RETURN…)."""
        i = self.spec.index("-j")
        return self.spec[i + 1]


@dataclass(frozen=True)
class RuleSet:
    """Owned chains with their rules, and the jumps to them from the built-in chains.

    `chains` maps (table, chain) to the chain's rules in order; `jumps` are the rules in
    built-in chains whose target is an owned chain. Used both for the desired state
    (`build_rules`) and for what is live in a netns (`iptables.read_back`).
    """

    chains: Mapping[tuple[str, str], tuple[Rule, ...]] = field(default_factory=dict)
    jumps: tuple[Rule, ...] = ()

    def rule_count(self) -> int:
        return len(self.jumps) + sum(len(r) for r in self.chains.values())

    def is_empty(self) -> bool:
        return not self.chains and not self.jumps

    def render(self) -> str:
        """iptables-save-like text: per table, the owned chains' declarations, then the jumps
        (built-in chains, in the order iptables-save lists them), then the owned rules."""
        lines: list[str] = []
        tables = sorted(
            {t for t, _ in self.chains} | {j.table for j in self.jumps},
            key=lambda t: (TABLES.index(t) if t in TABLES else len(TABLES), t),
        )
        for table in tables:
            lines.append(f"*{table}")
            owned = sorted(c for t, c in self.chains if t == table)
            lines.extend(f":{c} - [0:0]" for c in owned)
            jumps = [j for j in self.jumps if j.table == table]
            jumps.sort(key=lambda j: _BUILTIN_ORDER.get(j.chain, len(_BUILTIN_ORDER)))
            lines.extend(j.render() for j in jumps)
            for c in owned:
                lines.extend(r.render() for r in self.chains[(table, c)])
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"


_BUILTIN_ORDER = {
    c: i for i, c in enumerate(("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"))
}


def _rule(table: str, chain: str, *spec: str) -> Rule:
    return Rule(table, chain, tuple(spec))


def build_rules(spec: RedirectionSpec) -> RuleSet:
    """The complete rule set for one pod. Pure: same spec, same rules, same order."""
    r_out: list[Rule] = [
        # Everything the agent opens in the pod is tracked in a zone of its own (original
        # direction only: replies, in the default zone, still match). Otherwise a dial that
        # got no answer (a passthrough to an address nobody routes, a DNS query to a dead
        # server) leaves an unreplied entry that the app's next connection from the same
        # source port matches as a retransmission, so nat never sees it: it would leave the
        # pod unproxied for the entry's lifetime (TCP SYN_SENT 120 s, UDP 30 s).
        _rule("raw", CHAIN_OUTPUT, "-m", "mark", "--mark", _MARK,
              "-j", "CT", "--zone-orig", str(AGENT_CT_ZONE)),
    ]  # fmt: skip
    m_pre: list[Rule] = [
        # The agent's own packets reaching the pod's stack (its transparent connections to
        # the app, looped through lo) mark their connection so the app's replies can be
        # steered back to the agent by `ip rule fwmark` (see mangle MESH_OUTPUT).
        _rule("mangle", CHAIN_PREROUTING, "-m", "mark", "--mark", _MARK,
              "-j", "CONNMARK", "--set-xmark", _CONNMARK),
    ]  # fmt: skip
    m_out: list[Rule] = [
        # Copy the connmark onto locally generated packets (the app's replies) so routing
        # sees it: a packet's mark changed in mangle OUTPUT triggers a new route lookup.
        _rule("mangle", CHAIN_OUTPUT, "-m", "connmark", "--mark", _CONNMARK,
              "-j", "CONNMARK", "--restore-mark", "--nfmask", "0xffffffff",
              "--ctmask", "0xffffffff"),
    ]  # fmt: skip
    n_pre: list[Rule] = [
        # Kubelet probes (SNATed to PROBE_SOURCE on the node) reach the app directly.
        _rule("nat", CHAIN_PREROUTING, "-s", _PROBE, "-p", "tcp", "-m", "tcp", "-j", "RETURN"),
    ]
    n_pre += [
        _rule("nat", CHAIN_PREROUTING, "-p", "tcp", "-m", "tcp", "--dport", str(p), "-j", "RETURN")
        for p in spec.exclude_inbound_ports
    ]
    # Inbound TCP to anything but the tunnel port (peers connect to 15008 directly) and not
    # sent by the agent lands on the plaintext inbound listener.
    tail = ("-m", "mark", "!", "--mark", _MARK, "-j", "REDIRECT", "--to-ports",
            str(INBOUND_PLAINTEXT_PORT))  # fmt: skip
    if spec.include_inbound_ports is None:
        n_pre.append(
            _rule("nat", CHAIN_PREROUTING, "!", "-d", _LOOPBACK, "-p", "tcp", "-m", "tcp",
                  "!", "--dport", str(TUNNEL_PORT), *tail)
        )  # fmt: skip
    else:
        n_pre += [
            _rule("nat", CHAIN_PREROUTING, "!", "-d", _LOOPBACK, "-p", "tcp", "-m", "tcp",
                  "--dport", str(p), *tail)
            for p in spec.include_inbound_ports
        ]  # fmt: skip
    n_out: list[Rule] = [
        # Replies to kubelet probes are not captured either.
        _rule("nat", CHAIN_OUTPUT, "-d", _PROBE, "-p", "tcp", "-m", "tcp", "-j", "RETURN"),
        # Connections already carrying the restored connmark belong to the agent's delivery.
        _rule("nat", CHAIN_OUTPUT, "-p", "tcp", "-m", "mark", "--mark", _CONNMARK, "-j", "RETURN"),
        # The app calling itself by its pod IP (routed over lo) stays inside the pod.
        _rule("nat", CHAIN_OUTPUT, "!", "-d", _LOOPBACK, "-o", "lo", "-j", "RETURN"),
    ]
    n_out += [
        _rule("nat", CHAIN_OUTPUT, "-p", "tcp", "-m", "tcp", "--dport", str(p), "-j", "RETURN")
        for p in spec.exclude_outbound_ports
    ]
    n_out += [
        _rule("nat", CHAIN_OUTPUT, "-d", str(c), "-p", "tcp", "-j", "RETURN")
        for c in spec.exclude_outbound_cidrs
    ]
    if spec.dns_capture and DNS_PORT not in spec.exclude_outbound_ports:
        n_out += _dns_capture(spec)
    # Everything else the app opens over TCP, unless the agent opened it, goes to 15001.
    n_out.append(
        _rule("nat", CHAIN_OUTPUT, "!", "-d", _LOOPBACK, "-p", "tcp", "-m", "mark", "!",
              "--mark", _MARK, "-j", "REDIRECT", "--to-ports", str(OUTBOUND_CAPTURE_PORT))
    )  # fmt: skip
    chains = {
        ("raw", CHAIN_OUTPUT): tuple(r_out),
        ("mangle", CHAIN_PREROUTING): tuple(m_pre),
        ("mangle", CHAIN_OUTPUT): tuple(m_out),
        ("nat", CHAIN_PREROUTING): tuple(n_pre),
        ("nat", CHAIN_OUTPUT): tuple(n_out),
    }
    # One jump per owned chain, from the built-in chain of the same hook.
    jumps = tuple(_rule(t, _HOOK_OF[owned], "-j", owned) for t, owned in chains)
    return RuleSet(chains=chains, jumps=jumps)


def _dns_capture(spec: RedirectionSpec) -> list[Rule]:
    """The app's DNS (UDP and TCP to port 53) → the DNS proxy, as Istio ambient's in-pod rules.

    Placed after the TCP bypasses, so the outbound exclusions apply to DNS over TCP too; excluded
    CIDRs get a UDP bypass of their own here (an excluded port 53 drops DNS capture entirely, see
    build_rules), which is how Istio honours exclusions for DNS. UDP leaving through `lo` (a
    resolver inside the pod, 127.0.0.53 or the pod's own address) is not captured; for TCP the
    loopback bypass above and `! -d 127.0.0.1/32` do the same. Never the agent's own queries.
    """
    out = [
        _rule("nat", CHAIN_OUTPUT, "-d", str(c), "-p", "udp", "-m", "udp",
              "--dport", str(DNS_PORT), "-j", "RETURN")
        for c in spec.exclude_outbound_cidrs
    ]  # fmt: skip
    out.append(
        _rule("nat", CHAIN_OUTPUT, "!", "-o", "lo", "-p", "udp", "-m", "udp",
              "--dport", str(DNS_PORT), "-m", "mark", "!", "--mark", _MARK,
              "-j", "REDIRECT", "--to-ports", str(DNS_CAPTURE_PORT))
    )  # fmt: skip
    out.append(
        _rule("nat", CHAIN_OUTPUT, "!", "-d", _LOOPBACK, "-p", "tcp", "-m", "tcp",
              "--dport", str(DNS_PORT), "-m", "mark", "!", "--mark", _MARK,
              "-j", "REDIRECT", "--to-ports", str(DNS_CAPTURE_PORT))
    )  # fmt: skip
    return out


def diff_rules(expected: RuleSet, live: RuleSet) -> list[str]:
    """What differs between the desired and the live rule set, one readable line per problem."""
    problems: list[str] = []
    want_jumps = Counter(expected.jumps)
    have_jumps = Counter(live.jumps)
    for j in sorted(want_jumps.keys() | have_jumps.keys()):
        want, have = want_jumps[j], have_jumps[j]
        if have < want:
            problems.append(f"missing jump: {j}")
        elif have > want:
            what = "duplicate" if want else "unexpected"
            problems.append(f"{what} jump ({have}x): {j}")
    for key in sorted(expected.chains.keys() | live.chains.keys()):
        table, chain = key
        if key not in live.chains:
            problems.append(f"missing chain: {table}/{chain}")
            continue
        if key not in expected.chains:
            problems.append(f"unexpected chain: {table}/{chain}")
            continue
        want_rules, have_rules = expected.chains[key], live.chains[key]
        if want_rules == have_rules:
            continue
        want_c, have_c = Counter(want_rules), Counter(have_rules)
        missing = want_c - have_c
        extra = have_c - want_c
        problems += [f"missing rule: {r}" for r in want_rules if missing.pop(r, 0)]
        problems += [f"unexpected rule: {r}" for r in have_rules if extra.pop(r, 0)]
        if want_c == have_c:
            problems.append(f"rules out of order in {table}/{chain}")
    return problems
