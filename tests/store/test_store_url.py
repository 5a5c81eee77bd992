"""Store URL parsing: every backend's form, and clear errors for everything else."""

from __future__ import annotations

import pytest

from nodeagent.store import DEFAULT_URL, StoreError, open_store, parse_url


def test_memory() -> None:
    assert parse_url("memory://").name == ""
    assert parse_url("memory://agent-a").name == "agent-a"


def test_sqlite() -> None:
    u = parse_url("sqlite:///var/lib/x.db?retention=500")
    assert (u.scheme, u.path) == ("sqlite", "/var/lib/x.db")
    assert u.number("retention", 1) == 500
    assert parse_url(DEFAULT_URL).path == "/var/lib/nodeagent/mesh.db"


def test_etcd_endpoints_and_options() -> None:
    u = parse_url("etcd://a:1,b,[::1]:3?cacert=/ca.pem&user=root&password=s3cret&timeout=2")
    assert u.endpoints == (("a", 1), ("b", 2379), ("::1", 3))
    assert u.options["cacert"] == "/ca.pem"
    assert u.number("timeout", 5) == 2
    assert "s3cret" not in u.redacted
    assert "password=***" in u.redacted


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "expected <scheme>"),
        ("postgres://x", "unknown scheme 'postgres'"),
        ("sqlite://relative.db", "absolute path"),
        ("sqlite:///dir/", "directory"),
        ("sqlite:///x.db?bogus=1", "unknown option 'bogus'"),
        ("sqlite:///x.db?retention=abc", "retention='abc' is not a number"),
        ("sqlite:///x.db?retention=0", "is not a number >= 1"),
        ("etcd://", "no endpoints"),
        ("etcd://h:0", "port '0'"),
        ("etcd://h:99999", "port '99999'"),
        ("etcd://h:x", "port 'x'"),
        ("etcd://h:1,h:1", "listed twice"),
        ("etcd://[::1:1", "unclosed"),
        ("etcd://user@h:1", "expected host:port"),
        ("etcd://h:1?cert=/c.pem", "cert and key go together"),
        ("etcd://h:1?user=u", "user and password go together"),
        ("etcd://h:1?timeout=0", "timeout"),
        ("etcd://h:1?timeout=1&timeout=2", "given twice"),
        ("memory://a/b", "cannot contain"),
        ("memory://x#frag", "fragment"),
    ],
)
def test_malformed_urls_name_url_and_problem(url: str, problem: str) -> None:
    with pytest.raises(StoreError) as info:
        parse_url(url)
    assert problem in str(info.value)
    assert repr(url) in str(info.value) or not url


def test_password_never_in_errors() -> None:
    with pytest.raises(StoreError) as info:
        parse_url("etcd://h:1?user=u&password=hunter2&timeout=x")
    assert "hunter2" not in str(info.value)


async def test_open_store_rejects_malformed() -> None:
    with pytest.raises(StoreError, match="unknown scheme"):
        await open_store("redis://localhost")
