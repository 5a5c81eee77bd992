"""Upstream DNS servers from text and from resolv.conf."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nodeagent.dns.upstream import (
    parse_upstream,
    parse_upstreams,
    resolv_conf_nameservers,
    system_upstreams,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.10", ("10.0.0.10", 53)),
        ("10.0.0.10:5353", ("10.0.0.10", 5353)),
        ("fd00::a", ("fd00::a", 53)),
        ("[fd00::a]:5353", ("fd00::a", 5353)),
        (" 127.0.0.53 ", ("127.0.0.53", 53)),
    ],
)
def test_parse_upstream(text: str, want: tuple[str, int]) -> None:
    assert parse_upstream(text) == want


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("dns.google", "is not an IP address"),
        ("10.0.0.1:0", "is not a port"),
        ("10.0.0.1:+53", "is not a port"),
        ("[fd00::a]x", "expected [ipv6]:port"),
    ],
)
def test_parse_upstream_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_upstream(text)


def test_parse_upstreams_dedups_and_takes_tuples() -> None:
    assert parse_upstreams(["10.0.0.1", ("10.0.0.1", 53), ("fd00::1", 54)]) == [
        ("10.0.0.1", 53),
        ("fd00::1", 54),
    ]


def test_resolv_conf() -> None:
    text = """# generated
search default.svc.cluster.local svc.cluster.local
nameserver 10.96.0.10
nameserver not-an-address
; comment
nameserver 10.96.0.11
options ndots:5
nameserver 10.96.0.12
nameserver 10.96.0.13
"""
    assert resolv_conf_nameservers(text) == [
        ("10.96.0.10", 53),
        ("10.96.0.11", 53),
        ("10.96.0.12", 53),
    ]


def test_system_upstreams_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.53\n")
    assert system_upstreams(str(path)) == [("192.0.2.53", 53)]
    assert system_upstreams(str(tmp_path / "missing")) == []
