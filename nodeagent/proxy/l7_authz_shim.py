"""SHIM, to be replaced by h/authn's `nodeagent.authz.evaluate_http`: L7 AuthorizationPolicy
evaluation of one HTTP request, so the destination path works before that branch lands.

It covers what the data path needs: `to.operation` methods/notMethods, paths/notPaths (exact,
`prefix*`, `*suffix`, `*`), hosts/notHosts, ports/notPorts; `from.source` requestPrincipals/
notRequestPrincipals besides the L4 fields; `when` on `request.headers[...]`,
`request.auth.principal`, `request.auth.claims[...]` (one level) and the L4 keys. The L4 part
of every rule is the L4 evaluator's own code (`nodeagent.authz.evaluate`), so both agree.
Order as Istio: DENY, then ALLOW (none selecting: allowed), AUDIT reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.authz.evaluate import (
    Connection,
    _condition,
    _negative,
    _operation,
    _positive,
    _source,
    _string_match,
)
from nodeagent.snapshot.model import AuthorizationPolicies, AuthorizationPolicy

_L7_SOURCE = ("requestPrincipals", "notRequestPrincipals")
_L7_OPERATION = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")


@dataclass(frozen=True, slots=True)
class HttpAttributes:
    """One request's attributes for L7 authorization."""

    conn: Connection
    method: str
    path: str  # without the query
    host: str
    headers: Mapping[str, str]
    request_principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HttpAuthzDecision:
    allowed: bool
    policy: str | None  # ns/name of the deciding policy
    audit: tuple[str, ...]
    reason: str
    rule: int = -1  # the index of the DENY rule that matched


def evaluate_http(policies: AuthorizationPolicies, attrs: HttpAttributes) -> HttpAuthzDecision:
    audit = tuple(p.ref for p in policies.audit if _first_rule(p, attrs) is not None)
    for policy in policies.deny:
        rule = _first_rule(policy, attrs)
        if rule is not None:
            return HttpAuthzDecision(False, policy.ref, audit, "denied by DENY policy", rule)
    if not policies.allow:
        return HttpAuthzDecision(True, None, audit, "no ALLOW policy selects the workload")
    for policy in policies.allow:
        if _first_rule(policy, attrs) is not None:
            return HttpAuthzDecision(True, policy.ref, audit, "allowed by ALLOW policy")
    return HttpAuthzDecision(False, None, audit, "no ALLOW policy matched")


def _first_rule(policy: AuthorizationPolicy, attrs: HttpAttributes) -> int | None:
    for i, rule in enumerate(policy.rules):
        if _rule(rule, attrs, policy.namespace):
            return i
    return None


def _without(d: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _rule(rule: Mapping[str, Any], attrs: HttpAttributes, ns: str) -> bool:
    froms = rule.get("from")
    tos = rule.get("to")
    if froms and not any(_src(f.get("source") or {}, attrs, ns) for f in froms):
        return False
    if tos and not any(_op(t.get("operation") or {}, attrs) for t in tos):
        return False
    return all(_when(c, attrs) for c in rule.get("when") or ())


def _src(src: Mapping[str, Any], attrs: HttpAttributes, ns: str) -> bool:
    if not _source(_without(src, _L7_SOURCE), attrs.conn, ns, False):
        return False
    rp = attrs.request_principal
    return _positive(src.get("requestPrincipals"), rp, _string_match) and not _negative(
        src.get("notRequestPrincipals"), rp, _string_match
    )


def _op(op: Mapping[str, Any], attrs: HttpAttributes) -> bool:
    if not _operation(_without(op, _L7_OPERATION), attrs.conn, False):
        return False
    host = attrs.host.lower()
    checks = (
        ("methods", attrs.method, _string_match),
        ("paths", attrs.path, _string_match),
        ("hosts", host, _host_match),
    )
    for name, value, match in checks:
        if not _positive(op.get(name), value, match):
            return False
        if _negative(op.get("not" + name[0].upper() + name[1:]), value, match):
            return False
    return True


def _host_match(pattern: str, value: str) -> bool:
    pattern = pattern.lower()
    return _string_match(pattern, value) or _string_match(pattern, value.partition(":")[0])


def _when(cond: Mapping[str, Any], attrs: HttpAttributes) -> bool:
    key: str = cond.get("key", "")
    value: str | None
    if key.startswith("request.headers["):
        value = attrs.headers.get(key[len("request.headers[") : -1].lower())
    elif key == "request.auth.principal":
        value = attrs.request_principal
    elif key.startswith("request.auth.claims["):
        claim = attrs.claims.get(key[len("request.auth.claims[") : -1])
        values = [str(c) for c in claim] if isinstance(claim, list) else [str(claim)]
        if claim is None:
            values = []
        return (
            not cond.get("values")
            or any(_positive(cond["values"], v, _string_match) for v in values)
        ) and not any(_negative(cond.get("notValues"), v, _string_match) for v in values)
    else:
        return _condition(cond, attrs.conn, False)
    return _positive(cond.get("values"), value, _string_match) and not _negative(
        cond.get("notValues"), value, _string_match
    )
