"""Which fields of an AuthorizationPolicy need HTTP (Istio's TCP rule and its warning) or a JWT.

On a TCP port (one the Service does not declare as HTTP) the agent only has L4 attributes: an
ALLOW or AUDIT rule using one of these fields matches nothing there, and a DENY rule using one
is widened to its other fields (`evaluate.py`). `meshctl validate` and `apply` warn about each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeagent.authz.evaluate import L4_CONDITION_KEYS, L7_OPERATION_FIELDS, L7_SOURCE_FIELDS
from nodeagent.snapshot.model import AuthorizationPolicy


def l7_only_fields(spec: Mapping[str, Any]) -> list[str]:
    """The field paths of an AuthorizationPolicy spec that only HTTP requests have."""
    out: list[str] = []
    for i, rule in enumerate(spec.get("rules") or ()):
        if not isinstance(rule, Mapping):
            continue
        base = f"spec.rules[{i}]"
        for j, entry in enumerate(rule.get("from") or ()):
            src = entry.get("source") if isinstance(entry, Mapping) else None
            for name in L7_SOURCE_FIELDS:
                if isinstance(src, Mapping) and src.get(name):
                    out.append(f"{base}.from[{j}].source.{name}")
        for j, entry in enumerate(rule.get("to") or ()):
            op = entry.get("operation") if isinstance(entry, Mapping) else None
            for name in L7_OPERATION_FIELDS:
                if isinstance(op, Mapping) and op.get(name):
                    out.append(f"{base}.to[{j}].operation.{name}")
        for j, cond in enumerate(rule.get("when") or ()):
            key = cond.get("key") if isinstance(cond, Mapping) else None
            if isinstance(key, str) and key not in L4_CONDITION_KEYS:
                out.append(f"{base}.when[{j}].key ({key})")
    return out


def reads_requests(policy: AuthorizationPolicy) -> bool:
    """Whether a rule of `policy` has a field only HTTP requests have (`l7_only_fields`)."""
    return bool(l7_only_fields({"rules": policy.rules}))


def tcp_warning(action: str, field: str) -> str:
    """What `field` means for a policy of `action` on TCP ports."""
    if action == "DENY":
        effect = "the DENY rule is widened: it applies without this field"
    else:
        effect = f"the {action} rule matches nothing there"
    return f"{field} needs HTTP: on TCP ports {effect}"


def uses_jwt(policy: AuthorizationPolicy) -> bool:
    """Whether a rule of `policy` reads the request's JWT (request principals, request.auth.*)."""
    for rule in policy.rules:
        for entry in rule.get("from") or ():
            src = entry.get("source") or {}
            if any(src.get(name) for name in L7_SOURCE_FIELDS):
                return True
        for cond in rule.get("when") or ():
            if str(cond.get("key", "")).startswith("request.auth."):
                return True
    return False
