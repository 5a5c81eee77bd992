"""AuthorizationPolicy and PeerAuthentication (security.istio.io) with Istio's rules.

AuthorizationPolicy: selector, action ALLOW/DENY/AUDIT, rules of from.source, to.operation and
when conditions, every field Istio defines for them (JWT-based ones read what RequestAuthentication
verified, `validate/reqauth.py`). Not supported: CUSTOM action and provider, targetRef(s),
matchExpressions.

PeerAuthentication: selector, mtls.mode, portLevelMtls (needs a selector).
"""

from __future__ import annotations

import re
from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Validator,
    Walker,
    enum,
    ip_or_cidr,
    list_of,
    map_of,
    obj,
    string,
)
from nodeagent.config.validate.common import workload_selector

_MAX_VALUES = 1024


def _value(value: str) -> str | None:
    if not value:
        return "empty value is not allowed"
    return None


def _values(check: Any = _value) -> Validator:
    return list_of(string(check=check, max_len=1024), max_items=_MAX_VALUES)


def _port_string(value: str) -> str | None:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        return f"Invalid value: {value!r}: port must be between 1-65535"
    return None


def _source_check(w: Walker, path: str, value: Any) -> None:
    if value.get("serviceAccounts") and (value.get("namespaces") or value.get("principals")):
        w.error(path, "Cannot set serviceAccounts with namespaces or principals")
    if value.get("notServiceAccounts") and (
        value.get("notNamespaces") or value.get("notPrincipals")
    ):
        w.error(path, "Cannot set notServiceAccounts with notNamespaces or notPrincipals")


def _service_account(value: str) -> str | None:
    ns, sep, sa = value.rpartition("/")
    if not sa or (sep and not ns) or value.count("/") > 1:
        return f"Invalid value: {value!r}: service account must be 'name' or 'namespace/name'"
    return None


_source = obj(
    {
        "principals": _values(),
        "notPrincipals": _values(),
        "requestPrincipals": _values(),
        "notRequestPrincipals": _values(),
        "namespaces": _values(),
        "notNamespaces": _values(),
        "ipBlocks": _values(ip_or_cidr),
        "notIpBlocks": _values(ip_or_cidr),
        "remoteIpBlocks": _values(ip_or_cidr),
        "notRemoteIpBlocks": _values(ip_or_cidr),
        "serviceAccounts": _values(_service_account),
        "notServiceAccounts": _values(_service_account),
        "trustDomains": _values(),
        "notTrustDomains": _values(),
    },
    min_fields=1,
    checks=[_source_check],
)

_operation = obj(
    {
        "hosts": _values(),
        "notHosts": _values(),
        "ports": _values(_port_string),
        "notPorts": _values(_port_string),
        "methods": _values(),
        "notMethods": _values(),
        "paths": _values(),
        "notPaths": _values(),
    },
    min_fields=1,
)

_KEYS = re.compile(
    r"(request\.headers\[[^\]]+\]"
    r"|source\.ip|remote\.ip|source\.namespace|source\.principal|source\.serviceAccount"
    r"|source\.trustDomain"
    r"|request\.auth\.principal|request\.auth\.audiences|request\.auth\.presenter"
    r"|request\.auth\.claims(\[[^\]]+\])+"
    r"|destination\.ip|destination\.port|connection\.sni"
    r"|experimental\.envoy\.filters\.[A-Za-z0-9_.]+(\[[^\]]+\])+)\Z"
)
_IP_KEYS = {"source.ip", "remote.ip", "destination.ip"}


def _condition_check(w: Walker, path: str, value: Any) -> None:
    key = value["key"]
    if not _KEYS.match(key):
        w.error(f"{path}.key", f"Invalid value: {key!r}: unknown attribute")
        return
    if not value.get("values") and not value.get("notValues"):
        w.error(path, f"at least one of values or notValues must be set for key {key}")
    for field in ("values", "notValues"):
        for i, v in enumerate(value.get(field) or []):
            problem = None
            if key in _IP_KEYS:
                problem = ip_or_cidr(v)
            elif key == "destination.port":
                problem = _port_string(v)
            if problem:
                w.error(f"{path}.{field}[{i}]", problem)


_condition = obj(
    {"key": string(min_len=1), "values": _values(), "notValues": _values()},
    required=["key"],
    checks=[_condition_check],
)

_rule = obj(
    {
        "from": list_of(obj({"source": _source}, required=["source"]), max_items=256),
        "to": list_of(obj({"operation": _operation}, required=["operation"]), max_items=256),
        "when": list_of(_condition, max_items=256),
    }
)

authorization_policy_spec: Validator = obj(
    {
        "selector": workload_selector,
        "action": enum(["ALLOW", "DENY", "AUDIT"], unsupported=["CUSTOM"]),
        "rules": list_of(_rule, max_items=1024),
        "provider": Unsupported("CUSTOM authorization"),
        "targetRef": Unsupported("use selector"),
        "targetRefs": Unsupported("use selector"),
    }
)

_MODES = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
_mtls = obj({"mode": enum(_MODES)})


def _port_key(key: str) -> str | None:
    if not key.isdigit():
        return (
            f"Invalid value: {key!r}: type conversion error from string to port number "
            "(keys must be port numbers)"
        )
    if not 1 <= int(key) <= 65535:
        return f"Invalid value: {key}: port must be between 1-65535"
    return None


def _port_level(w: Walker, path: str, value: Any) -> None:
    if isinstance(value, dict):
        # YAML reads an unquoted 80 as an integer key; Istio's JSON always has strings.
        value = {
            str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v
            for k, v in value.items()
        }
    map_of(_mtls, key=_port_key, min_items=1, max_items=1024)(w, path, value)


def _peer_check(w: Walker, path: str, spec: Any) -> None:
    if spec.get("portLevelMtls") is not None:
        selector = spec.get("selector") or {}
        if not selector.get("matchLabels"):
            w.error(f"{path}.portLevelMtls", "portLevelMtls requires selector")


peer_authentication_spec: Validator = obj(
    {
        "selector": workload_selector,
        "mtls": _mtls,
        "portLevelMtls": _port_level,
    },
    checks=[_peer_check],
)


def normalize_peer_authentication(spec: dict[str, Any]) -> dict[str, Any]:
    """Port keys as strings (msgpack maps in the store need string keys)."""
    levels = spec.get("portLevelMtls")
    if isinstance(levels, dict):
        spec = {**spec, "portLevelMtls": {str(k): v for k, v in levels.items()}}
    return spec
