"""Evaluate Istio AuthorizationPolicies against one connection (L4) or one HTTP request.

Order: any matching DENY policy denies; AUDIT policies that match are only reported; with no
ALLOW policy selecting the workload the connection is allowed, otherwise one ALLOW policy must
match (deny by default). A policy matches when any of its rules matches; a rule matches when
one of its `from` entries, one of its `to` entries and every `when` condition match (an absent
list matches anything); inside one entry every field set must match (the `not*` fields must
not). An ALLOW policy without rules matches nothing (so it denies everything); a DENY policy
without rules matches nothing.

`authorize(policies, conn)` has only L4 attributes (source identity, source IP, destination IP
and port): it is what TCP ports get, with Istio's TCP rule for fields that need HTTP (methods,
paths, hosts, request principals, headers, JWT claims): in an ALLOW or AUDIT rule such a field
never matches, so the rule matches nothing; in a DENY rule it always matches, which widens the
DENY to the rule's remaining fields (istiod and ztunnel do the same). `policy_matches(policy,
conn, request)` with the request's `HttpFacts` evaluates every field (`authz.http`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.authz.attributes import Connection, HttpFacts
from nodeagent.authz.match import (
    any_negative,
    any_positive,
    host_match,
    ip_match,
    negative,
    path_match,
    positive,
    qualify,
    string_match,
)
from nodeagent.snapshot.model import AuthorizationPolicies, AuthorizationPolicy

L7_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals")
L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
L4_CONDITION_KEYS = frozenset(
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


def policy_matches(
    policy: AuthorizationPolicy, conn: Connection, request: HttpFacts | None = None
) -> bool:
    """Whether `policy` has a rule matching the connection (and, when given, its request)."""
    unknown = policy.action == "DENY"  # what an L7-only field evaluates to without a request
    return any(_rule(rule, conn, request, policy.namespace, unknown) for rule in policy.rules)


def _rule(
    rule: Mapping[str, Any], conn: Connection, req: HttpFacts | None, ns: str, unknown: bool
) -> bool:
    froms: Sequence[Mapping[str, Any]] | None = rule.get("from")
    tos: Sequence[Mapping[str, Any]] | None = rule.get("to")
    whens: Sequence[Mapping[str, Any]] | None = rule.get("when")
    if froms and not any(_source(f.get("source") or {}, conn, req, ns, unknown) for f in froms):
        return False
    if tos and not any(_operation(t.get("operation") or {}, conn, req, unknown) for t in tos):
        return False
    return all(_condition(c, conn, req, unknown) for c in whens or ())


def _both(field: str, src: Mapping[str, Any], value: str | None, match: Any) -> bool:
    """`field` (if set) matches and `notField` (if set) does not."""
    if not positive(src.get(field), value, match):
        return False
    return not negative(src.get("not" + field[0].upper() + field[1:]), value, match)


def _source(
    src: Mapping[str, Any], conn: Connection, req: HttpFacts | None, ns: str, unknown: bool
) -> bool:
    if req is None:
        if any(src.get(f) for f in L7_SOURCE_FIELDS) and not unknown:
            return False
    elif not _both("requestPrincipals", src, req.auth.principal, string_match):
        return False
    remote = conn.source_ip if req is None or req.remote_ip is None else req.remote_ip
    checks = (
        ("principals", conn.principal, string_match),
        ("namespaces", conn.namespace, string_match),
        ("ipBlocks", conn.source_ip, ip_match),
        ("remoteIpBlocks", remote, ip_match),  # no XFF at L4: remote = source
        ("trustDomains", conn.trust_domain, string_match),
    )
    for name, value, match in checks:
        if not _both(name, src, value, match):
            return False
    accounts = [qualify(a, ns) for a in src.get("serviceAccounts") or ()]
    if accounts and conn.service_account not in accounts:
        return False
    not_accounts = [qualify(a, ns) for a in src.get("notServiceAccounts") or ()]
    return not (not_accounts and conn.service_account in not_accounts)


def _operation(
    op: Mapping[str, Any], conn: Connection, req: HttpFacts | None, unknown: bool
) -> bool:
    if req is None:
        if any(op.get(f) for f in L7_OPERATION_FIELDS) and not unknown:
            return False
    else:
        if not _both("hosts", op, req.host, host_match):
            return False
        if not _both("methods", op, req.method, string_match):
            return False
        if not _both("paths", op, req.normalized_path, path_match):
            return False
    port = str(conn.destination_port)
    if op.get("ports") and port not in op["ports"]:
        return False
    return not (op.get("notPorts") and port in op["notPorts"])


def _condition(
    cond: Mapping[str, Any], conn: Connection, req: HttpFacts | None, unknown: bool
) -> bool:
    key = cond.get("key", "")
    values, not_values = cond.get("values"), cond.get("notValues")
    if key not in L4_CONDITION_KEYS:
        if req is None:
            return unknown
        found = req.condition_values(key)
        if found is None:  # a key this mesh does not know (experimental.envoy.*)
            return unknown
        return any_positive(values, found, string_match) and not any_negative(
            not_values, found, string_match
        )
    value: str | None
    match = string_match
    if key in ("source.ip", "remote.ip"):
        value, match = conn.source_ip, ip_match
        if key == "remote.ip" and req is not None and req.remote_ip is not None:
            value = req.remote_ip
    elif key == "destination.ip":
        value, match = conn.destination_ip, ip_match
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
    return positive(values, value, match) and not negative(not_values, value, match)
