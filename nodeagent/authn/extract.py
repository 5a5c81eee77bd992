"""Where the tokens of a request are, for a set of JWT rules: pure, Envoy's extractor rules.

Each rule reads its own locations (`JwtRule.headers`, `.params`, `fromCookies`; without any,
Envoy's default `Authorization: Bearer <token>` and `?access_token=`). A header value is used
after the first occurrence of its prefix, up to the first character that cannot be in a JWT.
One token found in several places is one token; it remembers which rules declared the places it
was found in, since only those rules' issuers may claim it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from nodeagent.snapshot.request_authn import JwtRule

_JWT_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")  # base64url and the dots


@dataclass(slots=True)
class Token:
    value: str
    rules: list[JwtRule] = field(default_factory=list)  # rules whose locations hold it
    headers: set[str] = field(default_factory=set)  # header names it was read from (lowercase)
    params: set[str] = field(default_factory=set)  # query parameters it was read from


def _after_prefix(value: str, prefix: str) -> str | None:
    if not prefix:
        return value.strip() or None
    at = value.find(prefix)
    if at < 0:
        return None
    found = _JWT_CHARS.match(value, at + len(prefix))
    return found.group(0) if found and found.group(0) else None


def query_params(path: str) -> list[tuple[str, str]]:
    _, _, query = path.partition("?")
    query = query.partition("#")[0]
    return parse_qsl(query, keep_blank_values=True)


def cookies(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        if name.lower() != "cookie":
            continue
        for part in value.split(";"):
            key, sep, val = part.strip().partition("=")
            if sep and key not in out:
                out[key] = val.strip().strip('"')
    return out


def extract(rules: Sequence[JwtRule], path: str, headers: Sequence[tuple[str, str]]) -> list[Token]:
    """The distinct tokens the request carries in any rule's locations, in a stable order."""
    found: dict[str, Token] = {}

    def add(value: str | None, rule: JwtRule) -> Token | None:
        if not value:
            return None
        token = found.setdefault(value, Token(value))
        if rule not in token.rules:
            token.rules.append(rule)
        return token

    lowered = [(n.lower(), v) for n, v in headers]
    params = query_params(path) if "?" in path else []
    jar = cookies(headers) if any(r.from_cookies for r in rules) else {}
    for rule in rules:
        for location in rule.headers:
            for name, value in lowered:
                if name == location.name:
                    token = add(_after_prefix(value, location.prefix), rule)
                    if token is not None:
                        token.headers.add(name)
        for param in rule.params:
            for name, value in params:
                if name == param:
                    token = add(value, rule)
                    if token is not None:
                        token.params.add(name)
        for cookie in rule.from_cookies:
            add(jar.get(cookie), rule)
    return list(found.values())
