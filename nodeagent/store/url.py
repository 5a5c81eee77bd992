"""Parsing store URLs (sans-IO): which backend, where, and with which options.

    memory://[name]                       in-process; a name shares state within the process
    sqlite:///abs/path.db[?retention=N]   embedded file, shared by the processes of one machine
    etcd://h1:2379[,h2:2379…][?opts]      real etcd v3 through its JSON gateway

etcd options: `cacert`, `cert`, `key` (paths; `cacert` switches to https, `cert`+`key` present a
client certificate), `user` and `password` (etcd auth), `timeout` (seconds per request).
Unknown options, missing parts and bad numbers are errors naming the URL and the problem; a
password never appears in an error or in `redacted`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote

from nodeagent.store.base import StoreError

_OPTIONS: dict[str, frozenset[str]] = {
    "memory": frozenset({"retention"}),
    "sqlite": frozenset({"retention"}),
    "etcd": frozenset({"cacert", "cert", "key", "user", "password", "timeout"}),
}
MAX_URL = 4096


@dataclass(frozen=True, slots=True)
class StoreURL:
    scheme: Literal["memory", "sqlite", "etcd"]
    redacted: str
    name: str = ""  # memory
    path: str = ""  # sqlite
    endpoints: tuple[tuple[str, int], ...] = ()  # etcd
    options: dict[str, str] = field(default_factory=dict)

    def number(self, option: str, default: float, *, minimum: float = 0) -> float:
        raw = self.options.get(option)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value >= minimum:
            raise StoreError(
                f"store URL {self.redacted!r}: option {option}={raw!r} is not a number >= {minimum}"
            )
        return value


def _redact(url: str) -> str:
    head, sep, query = url.partition("?")
    if not sep:
        return url
    parts = []
    for piece in query.split("&"):
        name, eq, _ = piece.partition("=")
        parts.append(f"{name}=***" if name == "password" and eq else piece)
    return head + "?" + "&".join(parts)


def parse_url(url: str) -> StoreURL:
    """Parse a store URL; raise StoreError naming the URL and the problem."""
    if len(url) > MAX_URL:
        raise StoreError(f"store URL of {len(url)} characters is over the {MAX_URL} bound")
    red = _redact(url)

    def bad(why: str) -> StoreError:
        return StoreError(f"store URL {red!r}: {why}")

    scheme, sep, rest = url.partition("://")
    if not sep:
        raise bad("expected <scheme>://…, one of memory://, sqlite:///path, etcd://host:port")
    if scheme not in _OPTIONS:
        raise bad(f"unknown scheme {scheme!r}; one of memory, sqlite, etcd")
    where, _, query = rest.partition("?")
    if "#" in where or "#" in query:
        raise bad("a fragment (#…) is not allowed")
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise bad(f"malformed query: {exc}") from None
    for name, value in pairs:
        if name not in _OPTIONS[scheme]:
            allowed = ", ".join(sorted(_OPTIONS[scheme]))
            raise bad(f"unknown option {name!r} for {scheme}; allowed: {allowed}")
        if name in options:
            raise bad(f"option {name!r} given twice")
        options[name] = value

    if scheme == "memory":
        if "/" in where:
            raise bad("a memory store name cannot contain '/'")
        result = StoreURL("memory", red, name=where, options=options)
    elif scheme == "sqlite":
        if not where.startswith("/"):
            raise bad("expected sqlite:///absolute/path.db (three slashes, absolute path)")
        if where.endswith("/"):
            raise bad("the path names a directory, not a database file")
        result = StoreURL("sqlite", red, path=where, options=options)
    else:
        result = StoreURL("etcd", red, endpoints=_endpoints(where, bad), options=options)
        if ("cert" in options) != ("key" in options):
            raise bad("options cert and key go together")
        if ("user" in options) != ("password" in options):
            raise bad("options user and password go together")
        result.number("timeout", 5.0, minimum=0.1)
    if "retention" in options:
        result.number("retention", 0, minimum=1)
    return result


def _endpoints(where: str, bad: Callable[[str], StoreError]) -> tuple[tuple[str, int], ...]:
    if not where:
        raise bad("no endpoints; expected etcd://host:port[,host:port…]")
    out: list[tuple[str, int]] = []
    for item in where.split(","):
        host, port_s = item, ""
        if item.startswith("["):  # [ipv6]:port
            close = item.find("]")
            if close < 0:
                raise bad(f"endpoint {item!r}: unclosed '['")
            host, port_s = item[1:close], item[close + 1 :].removeprefix(":")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise bad(f"endpoint {item!r}: {host!r} is not an IPv6 address") from None
        elif ":" in item:
            host, _, port_s = item.rpartition(":")
        if not host or "/" in host or "@" in host:
            raise bad(f"endpoint {item!r}: expected host:port")
        if not port_s:
            port = 2379
        elif port_s.isdigit() and 0 < int(port_s) < 65536:
            port = int(port_s)
        else:
            raise bad(f"endpoint {item!r}: port {port_s!r} is not a number in 1..65535")
        if (host, port) in out:
            raise bad(f"endpoint {item!r} is listed twice")
        out.append((host, port))
    return tuple(out)


def format_endpoint(host: str, port: int) -> str:
    """host:port, bracketing IPv6 literals (for Host headers and messages)."""
    return f"[{host}]:{port}" if ":" in host else f"{quote(host, safe='.-_')}:{port}"
