"""The rule set as plain data: golden renderings, annotation parsing, and the diff used by check.

No root needed. The goldens are the iptables-save text the root tests find live in a pod netns;
regenerate them with INPOD_UPDATE_GOLDEN=1 after an intended change, and review the diff.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from nodeagent.contract import CHAIN_PREFIX
from nodeagent.inpod.errors import AnnotationError
from nodeagent.inpod.rules import (
    RedirectionSpec,
    Rule,
    RuleSet,
    build_rules,
    diff_rules,
)

GOLDEN = Path(__file__).parent / "golden"
EXCLUDES = RedirectionSpec(
    exclude_outbound_ports=(9090, 80),
    exclude_inbound_ports=(8082,),
    exclude_outbound_cidrs=(
        ipaddress.IPv4Network("10.96.0.0/12"),
        ipaddress.IPv4Network("192.168.1.5/32"),
    ),
)
A = "traffic.sidecar.istio.io/"


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("default", RedirectionSpec()),
        ("excludes", EXCLUDES),
        ("include_inbound", RedirectionSpec(include_inbound_ports=(9080, 8080))),
    ],
)
def test_golden(name: str, spec: RedirectionSpec) -> None:
    path = GOLDEN / f"{name}.rules"
    got = build_rules(spec).render()
    if os.environ.get("INPOD_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text()


def test_default_rules_capture_as_istio_ambient() -> None:
    rs = build_rules(RedirectionSpec())
    nat_out = [r.render() for r in rs.chains[("nat", "MESH_OUTPUT")]]
    nat_pre = [r.render() for r in rs.chains[("nat", "MESH_PRERT")]]
    # The capture rules come last, after every bypass.
    assert nat_out[-1] == (
        "-A MESH_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15001"
    )
    assert nat_pre[-1] == (
        "-A MESH_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 "
        "-m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"
    )
    assert nat_pre[0] == "-A MESH_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j RETURN"
    assert {(j.table, j.chain, j.target) for j in rs.jumps} == {
        ("raw", "OUTPUT", "MESH_OUTPUT"),
        ("mangle", "PREROUTING", "MESH_PRERT"),
        ("mangle", "OUTPUT", "MESH_OUTPUT"),
        ("nat", "PREROUTING", "MESH_PRERT"),
        ("nat", "OUTPUT", "MESH_OUTPUT"),
    }
    assert all(c.startswith(CHAIN_PREFIX) for _, c in rs.chains)


def test_build_is_deterministic_whatever_the_input_order() -> None:
    a = RedirectionSpec(exclude_outbound_ports=(80, 9090, 80))
    b = RedirectionSpec(exclude_outbound_ports=(9090, 80))
    assert a == b
    assert build_rules(a).render() == build_rules(b).render()


def test_from_annotations_full() -> None:
    spec = RedirectionSpec.from_annotations(
        {
            A + "excludeOutboundPorts": "9090, 80",
            A + "excludeInboundPorts": "8082",
            A + "excludeOutboundIPRanges": "10.96.0.0/12,192.168.1.5",
            "unrelated.example.com/thing": "whatever",
        }
    )
    assert spec == EXCLUDES
    assert spec.include_inbound_ports is None


@pytest.mark.parametrize(
    ("value", "want"),
    [("*", None), (" * ", None), ("", ()), ("8080,9080", (8080, 9080))],
)
def test_include_inbound_ports(value: str, want: tuple[int, ...] | None) -> None:
    spec = RedirectionSpec.from_annotations({A + "includeInboundPorts": value})
    assert spec.include_inbound_ports == want


def test_include_inbound_none_captures_nothing_inbound() -> None:
    rs = build_rules(RedirectionSpec(include_inbound_ports=()))
    assert not any("15006" in r.render() for r in rs.chains[("nat", "MESH_PRERT")])


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("excludeOutboundPorts", "80,http", "'http' is not a TCP port"),
        ("excludeOutboundPorts", "0", "'0' is not a TCP port"),
        ("excludeInboundPorts", "65536", "'65536' is not a TCP port"),
        ("excludeInboundPorts", "+80", "'+80' is not a TCP port"),
        ("includeInboundPorts", "15008", "15008 is the mesh tunnel port"),
        ("excludeOutboundIPRanges", "10.0.0.1/8", "'10.0.0.1/8' is not a CIDR"),
        ("excludeOutboundIPRanges", "banana", "'banana' is not a CIDR"),
        ("excludeOutboundIPRanges", "fd00::/8", "IPv6 ranges are not supported"),
        ("excludeOutboundPorts", "1," * 300, "more than 256 entries"),
        ("excludeOutboundPorts", "1" * 5000, "longer than 4096"),
        ("interceptionMode", "TPROXY", "not supported by this mesh"),
    ],
)
def test_from_annotations_rejects(key: str, value: str, fragment: str) -> None:
    with pytest.raises(AnnotationError) as info:
        RedirectionSpec.from_annotations({A + key: value})
    assert fragment in str(info.value)
    assert info.value.annotation == A + key
    assert str(info.value).startswith(f"annotation {A + key}=")


def test_spec_constructor_validates() -> None:
    with pytest.raises(ValueError, match="70000"):
        RedirectionSpec(exclude_outbound_ports=(70000,))
    with pytest.raises(ValueError, match="tunnel"):
        RedirectionSpec(include_inbound_ports=(15008,))


def test_diff_identical_is_empty() -> None:
    rs = build_rules(EXCLUDES)
    assert diff_rules(rs, rs) == []


def _without(rs: RuleSet, victim: Rule) -> RuleSet:
    chains = {k: tuple(r for r in v if r != victim) for k, v in rs.chains.items()}
    return RuleSet(chains=chains, jumps=tuple(j for j in rs.jumps if j != victim))


def test_diff_names_missing_extra_duplicate_and_order() -> None:
    want = build_rules(RedirectionSpec())
    victim = want.chains[("nat", "MESH_OUTPUT")][-1]
    assert diff_rules(want, _without(want, victim)) == [f"missing rule: {victim}"]

    jump = want.jumps[0]
    assert diff_rules(want, _without(want, jump)) == [f"missing jump: {jump}"]
    doubled = RuleSet(chains=want.chains, jumps=(*want.jumps, jump))
    assert diff_rules(want, doubled) == [f"duplicate jump (2x): {jump}"]

    extra = Rule("nat", "MESH_OUTPUT", ("-p", "tcp", "-j", "RETURN"))
    chains = dict(want.chains)
    chains[("nat", "MESH_OUTPUT")] += (extra,)
    assert diff_rules(want, RuleSet(chains=chains, jumps=want.jumps)) == [
        f"unexpected rule: {extra}"
    ]

    chains = dict(want.chains)
    chains[("nat", "MESH_OUTPUT")] = tuple(reversed(chains[("nat", "MESH_OUTPUT")]))
    assert diff_rules(want, RuleSet(chains=chains, jumps=want.jumps)) == [
        "rules out of order in nat/MESH_OUTPUT"
    ]

    chains = dict(want.chains)
    chains[("nat", "MESH_OLD")] = ()
    del chains[("mangle", "MESH_PRERT")]
    assert diff_rules(want, RuleSet(chains=chains, jumps=want.jumps)) == [
        "missing chain: mangle/MESH_PRERT",
        "unexpected chain: nat/MESH_OLD",
    ]

    assert RuleSet().is_empty()
    assert len(diff_rules(want, RuleSet())) == len(want.chains) + len(want.jumps)


# -- DNS capture (nodeagent.dns serves 15053) --------------------------------------------------

DNS_UDP = (
    "-A MESH_OUTPUT ! -o lo -p udp -m udp --dport 53 -m mark ! --mark 0x539/0xfff "
    "-j REDIRECT --to-ports 15053"
)
DNS_TCP = (
    "-A MESH_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff "
    "-j REDIRECT --to-ports 15053"
)


def _nat_output(spec: RedirectionSpec) -> list[str]:
    return [r.render() for r in build_rules(spec).chains[("nat", "MESH_OUTPUT")]]


def test_dns_capture_is_on_by_default_before_the_tcp_capture() -> None:
    out = _nat_output(RedirectionSpec())
    # After the loopback bypass (a resolver inside the pod is left alone), before 15001.
    assert out.index(DNS_UDP) > out.index("-A MESH_OUTPUT ! -d 127.0.0.1/32 -o lo -j RETURN")
    assert out[-3:-1] == [DNS_UDP, DNS_TCP]
    assert out[-1].endswith("--to-ports 15001")


def test_dns_capture_off_removes_exactly_the_two_rules() -> None:
    on, off = _nat_output(RedirectionSpec()), _nat_output(RedirectionSpec(dns_capture=False))
    assert [r for r in on if r not in off] == [DNS_UDP, DNS_TCP]
    assert not any("15053" in r for r in off)


def test_dns_capture_honours_outbound_exclusions() -> None:
    out = _nat_output(EXCLUDES)
    # Excluded CIDRs bypass DNS capture over UDP too (TCP already RETURNs earlier).
    assert "-A MESH_OUTPUT -d 10.96.0.0/12 -p udp -m udp --dport 53 -j RETURN" in out
    assert out.index("-A MESH_OUTPUT -d 10.96.0.0/12 -p udp -m udp --dport 53 -j RETURN") < (
        out.index(DNS_UDP)
    )
    # Excluding port 53 turns DNS capture off for both protocols.
    assert not any("15053" in r for r in _nat_output(RedirectionSpec(exclude_outbound_ports=(53,))))


@pytest.mark.parametrize(("value", "want"), [("false", False), ("True", True), (" true ", True)])
def test_dns_capture_annotation(value: str, want: bool) -> None:
    spec = RedirectionSpec.from_annotations({"ambient.istio.io/dns-capture": value})
    assert spec.dns_capture is want
    assert RedirectionSpec.from_annotations({}).dns_capture is True


def test_dns_capture_annotation_rejects_other_values() -> None:
    with pytest.raises(AnnotationError, match="expected 'true' or 'false'") as info:
        RedirectionSpec.from_annotations({"ambient.istio.io/dns-capture": "off"})
    assert info.value.annotation == "ambient.istio.io/dns-capture"
    with pytest.raises(TypeError, match="dns_capture"):
        RedirectionSpec(dns_capture="no")  # type: ignore[arg-type]
