"""Istio's value matchers, shared by the L4 and the HTTP evaluation (pure).

Strings: exact, `prefix*`, `*suffix`, or `*` (present, non-empty). IPs: an address or CIDR.
Hosts: case-insensitive, a pattern without a port also matching the host with any port. Paths:
the same string forms plus Istio's templates, `{*}` one segment and `{**}` any rest (last only).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable

Matcher = Callable[[str, str], bool]


def positive(patterns: Iterable[str] | None, value: str | None, match: Matcher) -> bool:
    """An unset/empty list matches anything; otherwise one pattern must match."""
    if not patterns:
        return True
    return value is not None and any(match(p, value) for p in patterns)


def negative(patterns: Iterable[str] | None, value: str | None, match: Matcher) -> bool:
    """Whether one `not*` pattern matches; a missing value (no identity) matches none."""
    if not patterns or value is None:
        return False
    return any(match(p, value) for p in patterns)


def any_positive(patterns: Iterable[str] | None, values: Iterable[str], match: Matcher) -> bool:
    """`positive` for a multi-valued attribute (audiences, a list claim): one value suffices."""
    if not patterns:
        return True
    found = list(values)
    return any(positive(patterns, v, match) for v in found)


def any_negative(patterns: Iterable[str] | None, values: Iterable[str], match: Matcher) -> bool:
    return any(negative(patterns, v, match) for v in values)


def string_match(pattern: str, value: str) -> bool:
    """Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present, non-empty)."""
    if pattern == "*":
        return bool(value)
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def ip_match(pattern: str, value: str) -> bool:
    try:
        return ipaddress.ip_address(value) in ipaddress.ip_network(pattern, strict=False)
    except ValueError:  # validation rejects bad CIDRs; an odd peer address matches nothing
        return False


def qualify(account: str, namespace: str) -> str:
    return account if "/" in account else f"{namespace}/{account}"


def host_match(pattern: str, host: str) -> bool:
    """`hosts`: case-insensitive; a pattern without a port ignores the request's port."""
    pattern, host = pattern.lower(), host.lower()
    if ":" not in pattern.rpartition("]")[2]:
        host = _without_port(host)
    return string_match(pattern, host)


def _without_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host.partition("]")[0] + "]"
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def path_match(pattern: str, path: str) -> bool:
    """`paths`: the string forms, or a template with `{*}` / `{**}` segments."""
    if "{" in pattern:
        return _template(pattern).fullmatch(path) is not None
    return string_match(pattern, path)


@functools.lru_cache(maxsize=4096)
def _template(pattern: str) -> re.Pattern[str]:
    out = []
    for piece in re.split(r"(\{\*\*\}|\{\*\})", pattern):
        if piece == "{**}":
            out.append(r".*")
        elif piece == "{*}":
            out.append(r"[^/]+")
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out), re.DOTALL)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def normalize_path(target: str) -> str:
    """The request target's path as Istio's default (BASE) normalization gives it to its
    matchers: no query or fragment, percent-escaped unreserved characters decoded (others
    upper-cased), `.` and `..` segments resolved (RFC 3986 5.2.4)."""
    path = target.partition("?")[0].partition("#")[0] or "/"

    def unescape(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else f"%{m.group(1).upper()}"

    path = _ESCAPE.sub(unescape, path)
    segments = path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result
