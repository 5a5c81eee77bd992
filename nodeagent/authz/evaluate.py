"""Evaluate Istio AuthorizationPolicies against one L4 connection, as ztunnel does.

Order: any matching DENY policy denies; AUDIT policies that match are only reported; with no
ALLOW policy selecting the workload the connection is allowed, otherwise one ALLOW policy must
match (deny by default). A policy matches when any of its rules matches; a rule matches when
one of its `from` entries, one of its `to` entries and every `when` condition match (an absent
list matches anything); inside one entry every field set must match (the `not*` fields must
not). An ALLOW policy without rules matches nothing (so it denies everything); a DENY policy
without rules matches nothing.

Only L4 attributes exist here (source identity, source IP, destination IP and port). A field
that needs L7 (methods, paths, hosts, request principals, headers, JWT claims, SNI) cannot be
checked, so it fails closed: it never matches in an ALLOW or AUDIT rule and always matches in a
DENY rule, which makes the DENY broader (istiod and ztunnel treat L7-only rules the same way).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.snapshot.model import AuthorizationPolicies, AuthorizationPolicy

_L7_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals")
_L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_L4_CONDITION_KEYS = frozenset(
    [
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "source.trustDomain",
        "destination.ip",
        "destination.port",
    ]
)


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


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str | None  # namespace/name of the policy that decided; None: no policy decided
    reason: str
    audited: tuple[str, ...] = ()  # AUDIT policies that matched


def authorize(policies: AuthorizationPolicies, conn: Connection) -> AuthzDecision:
    audited = tuple(p.ref for p in policies.audit if policy_matches(p, conn))
    for policy in policies.deny:
        if policy_matches(policy, conn):
            return AuthzDecision(False, policy.ref, "denied by DENY policy", audited)
    if not policies.allow:
        return AuthzDecision(True, None, "no ALLOW policy selects the workload", audited)
    for policy in policies.allow:
        if policy_matches(policy, conn):
            return AuthzDecision(True, policy.ref, "allowed by ALLOW policy", audited)
    names = ",".join(p.ref for p in policies.allow)
    return AuthzDecision(False, names, "no ALLOW policy matched", audited)


def policy_matches(policy: AuthorizationPolicy, conn: Connection) -> bool:
    unknown = policy.action == "DENY"  # what an L7-only field evaluates to
    return any(_rule(rule, conn, policy.namespace, unknown) for rule in policy.rules)


def _rule(rule: Mapping[str, Any], conn: Connection, ns: str, unknown: bool) -> bool:
    froms: Sequence[Mapping[str, Any]] | None = rule.get("from")
    tos: Sequence[Mapping[str, Any]] | None = rule.get("to")
    whens: Sequence[Mapping[str, Any]] | None = rule.get("when")
    if froms and not any(_source(f.get("source") or {}, conn, ns, unknown) for f in froms):
        return False
    if tos and not any(_operation(t.get("operation") or {}, conn, unknown) for t in tos):
        return False
    return all(_condition(c, conn, unknown) for c in whens or ())


def _source(src: Mapping[str, Any], conn: Connection, ns: str, unknown: bool) -> bool:
    if any(src.get(f) for f in _L7_SOURCE_FIELDS) and not unknown:
        return False
    principal, namespace = conn.principal, conn.namespace
    checks = (
        ("principals", principal, _string_match),
        ("namespaces", namespace, _string_match),
        ("ipBlocks", conn.source_ip, _ip_match),
        ("remoteIpBlocks", conn.source_ip, _ip_match),  # no XFF at L4: remote = source
        ("trustDomains", conn.trust_domain, _string_match),
    )
    for name, value, match in checks:
        if not _positive(src.get(name), value, match):
            return False
        if _negative(src.get("not" + name[0].upper() + name[1:]), value, match):
            return False
    accounts = [_qualify(a, ns) for a in src.get("serviceAccounts") or ()]
    if accounts and conn.service_account not in accounts:
        return False
    not_accounts = [_qualify(a, ns) for a in src.get("notServiceAccounts") or ()]
    return not (not_accounts and conn.service_account in not_accounts)


def _operation(op: Mapping[str, Any], conn: Connection, unknown: bool) -> bool:
    if any(op.get(f) for f in _L7_OPERATION_FIELDS) and not unknown:
        return False
    port = str(conn.destination_port)
    if op.get("ports") and port not in op["ports"]:
        return False
    return not (op.get("notPorts") and port in op["notPorts"])


def _condition(cond: Mapping[str, Any], conn: Connection, unknown: bool) -> bool:
    key = cond.get("key", "")
    if key not in _L4_CONDITION_KEYS:
        return unknown
    value: str | None
    match = _string_match
    if key in ("source.ip", "remote.ip"):
        value, match = conn.source_ip, _ip_match
    elif key == "destination.ip":
        value, match = conn.destination_ip, _ip_match
    elif key == "destination.port":
        value = str(conn.destination_port)
    elif key == "source.namespace":
        value = conn.namespace
    elif key == "source.principal":
        value = conn.principal
    elif key == "source.serviceAccount":
        value = conn.service_account
    else:  # source.trustDomain
        value = conn.trust_domain
    return _positive(cond.get("values"), value, match) and not _negative(
        cond.get("notValues"), value, match
    )


def _positive(patterns: Iterable[str] | None, value: str | None, match: Any) -> bool:
    """An unset/empty list matches anything; otherwise one pattern must match."""
    if not patterns:
        return True
    return value is not None and any(match(p, value) for p in patterns)


def _negative(patterns: Iterable[str] | None, value: str | None, match: Any) -> bool:
    """Whether one `not*` pattern matches; a missing value (no identity) matches none."""
    if not patterns or value is None:
        return False
    return any(match(p, value) for p in patterns)


def _string_match(pattern: str, value: str) -> bool:
    """Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present, non-empty)."""
    if pattern == "*":
        return bool(value)
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _ip_match(pattern: str, value: str) -> bool:
    try:
        return ipaddress.ip_address(value) in ipaddress.ip_network(pattern, strict=False)
    except ValueError:  # validation rejects bad CIDRs; an odd peer address matches nothing
        return False


def _qualify(account: str, namespace: str) -> str:
    return account if "/" in account else f"{namespace}/{account}"
