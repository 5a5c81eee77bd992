"""Builders for AuthorizationPolicy rules in tests: the policy, and its from/to/when parts."""

from __future__ import annotations

from typing import Any

from nodeagent.snapshot.model import AuthorizationPolicy, freeze


def pol(
    action: str, *rules: dict[str, Any], name: str = "p", ns: str = "foo"
) -> AuthorizationPolicy:
    return AuthorizationPolicy(ns, name, action, None, tuple(freeze(r) for r in rules))  # type: ignore[arg-type]


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def when(
    key: str, values: list[str] | None = None, not_values: list[str] | None = None
) -> dict[str, Any]:
    cond: dict[str, Any] = {"key": key}
    if values:
        cond["values"] = values
    if not_values:
        cond["notValues"] = not_values
    return {"when": [cond]}
