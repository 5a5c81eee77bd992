"""Where forwarded queries go: upstream DNS servers as (ip, port), from text or resolv.conf.

Pure parsing, no I/O except `system_upstreams`, which reads the node's resolv.conf once. The
agent runs in the node's network namespace, so the node's resolver is the right upstream for
every pod on it (ztunnel's shared-proxy mode does the same with its own /etc/resolv.conf).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

DNS_PORT = 53
MAX_NAMESERVERS = 3  # glibc's MAXNS: later nameserver lines are ignored by every resolver too
RESOLV_CONF = "/etc/resolv.conf"

Upstream = tuple[str, int]


def parse_upstream(text: str) -> Upstream:
    """`ip`, `ip:port`, `[ipv6]:port` or a bare IPv6 address → (ip, port)."""
    raw = text.strip()
    host, port = raw, DNS_PORT
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"upstream DNS server {text!r}: expected [ipv6]:port")
        if rest:
            port = _port(text, rest[1:])
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        port = _port(text, port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"upstream DNS server {text!r}: {host!r} is not an IP address") from None
    return (str(ip), port)


def _port(text: str, raw: str) -> int:
    if not (raw.isascii() and raw.isdecimal()) or not 1 <= int(raw) <= 65535:
        raise ValueError(f"upstream DNS server {text!r}: {raw!r} is not a port (1-65535)")
    return int(raw)


def parse_upstreams(items: Iterable[str | Upstream]) -> list[Upstream]:
    out: list[Upstream] = []
    for item in items:
        if isinstance(item, str):
            out.append(parse_upstream(item))
        else:
            host, port = item
            out.append(parse_upstream(f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    return list(dict.fromkeys(out))


def resolv_conf_nameservers(text: str) -> list[Upstream]:
    """The `nameserver` lines of a resolv.conf, as upstreams on port 53 (at most three).

    Addresses that do not parse are skipped, like glibc does with what it cannot use.
    """
    out: list[Upstream] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            out.append((str(ipaddress.ip_address(fields[1])), DNS_PORT))
        except ValueError:
            continue
        if len(out) == MAX_NAMESERVERS:
            break
    return list(dict.fromkeys(out))


def system_upstreams(path: str = RESOLV_CONF) -> list[Upstream]:
    """The node's resolvers; [] when the file is missing or names none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return resolv_conf_nameservers(f.read(64 * 1024))
    except OSError:
        return []
