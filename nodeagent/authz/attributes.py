"""What authorization looks at: a connection's L4 facts, and an HTTP request's on top of them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.authn import RequestAuth
from nodeagent.authz.match import normalize_path


@dataclass(frozen=True, slots=True)
class Connection:
    """The L4 facts of one connection. `source_identity` is the verified SPIFFE id, None for a
    plaintext client."""

    source_ip: str
    destination_ip: str
    destination_port: int
    source_identity: str | None = None

    @property
    def principal(self) -> str | None:
        """Istio's principal: the SPIFFE id without `spiffe://`."""
        if not self.source_identity:
            return None
        return self.source_identity.removeprefix("spiffe://")

    def _path_part(self, key: str) -> str | None:
        principal = self.principal
        if principal is None:
            return None
        parts = principal.split("/")
        # <trust-domain>/ns/<ns>/sa/<sa>
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return {"td": parts[0], "ns": parts[2], "sa": parts[4]}[key]
        return None

    @property
    def namespace(self) -> str | None:
        return self._path_part("ns")

    @property
    def service_account(self) -> str | None:
        ns, sa = self._path_part("ns"), self._path_part("sa")
        return f"{ns}/{sa}" if ns is not None and sa is not None else None

    @property
    def trust_domain(self) -> str | None:
        return self._path_part("td")


_HEADER_KEY = re.compile(r"request\.headers\[([^\]]+)\]\Z")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\]]+\])+)\Z")


@dataclass(frozen=True, slots=True)
class HttpFacts:
    """An HTTP request's facts beyond its connection's. `path` is the request target as
    received; `normalized_path` (what `paths` match) drops the query and resolves dot segments.
    `remote_ip` is the original client (from a trusted X-Forwarded-For), None: the source."""

    host: str
    method: str
    path: str
    headers: Sequence[tuple[str, str]] = ()
    auth: RequestAuth = field(default_factory=RequestAuth.empty)
    sni: str | None = None
    remote_ip: str | None = None
    normalized_path: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalized_path", normalize_path(self.path))

    def header(self, name: str) -> str | None:
        """All values of header `name` joined by "," (as Envoy presents them), None if absent."""
        name = name.lower()
        found = [v for n, v in self.headers if n.lower() == name]
        return ",".join(found) if found else None

    def condition_values(self, key: str) -> tuple[str, ...] | None:
        """The values of an L7 `when` key (empty: absent); None for a key this mesh does not
        know."""
        if key == "request.auth.principal":
            return _opt(self.auth.principal)
        if key == "request.auth.audiences":
            return self.auth.audiences
        if key == "request.auth.presenter":
            return _opt(self.auth.presenter)
        if key == "connection.sni":
            return _opt(self.sni)
        m = _HEADER_KEY.match(key)
        if m:
            return _opt(self.header(m.group(1)))
        m = _CLAIM_KEY.match(key)
        if m:
            return claim_values(self.auth.claims, m.group(1)[1:-1].split("]["))
        return None


def _opt(value: str | None) -> tuple[str, ...]:
    return () if value is None else (value,)


def claim_values(claims: Mapping[str, Any], path: Sequence[str]) -> tuple[str, ...]:
    """A (nested) claim's string values: a string, or the strings of a list; else none."""
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return ()
        value = value[part]
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str))
    return ()
