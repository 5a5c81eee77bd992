"""RequestAuthentication (security.istio.io v1/v1beta1) with Istio's rules (CRD schema + webhook).

selector, or targetRef(s) of kind Service in the policy's own namespace (one of the two);
jwtRules: issuer (required), audiences, jwksUri (http/https) or inline jwks, fromHeaders (name
and prefix), fromParams, fromCookies, outputPayloadToHeader, outputClaimToHeaders (claim →
header), forwardOriginalToken, timeout, spaceDelimitedClaims. Not supported: targetRef kinds
other than Service (Gateway API Gateways and ServiceEntries are not policy targets here).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from nodeagent.config.duration import DurationError, parse_duration
from nodeagent.config.schema import (
    Validator,
    Walker,
    boolean,
    list_of,
    obj,
    string,
)
from nodeagent.config.validate.common import header_name, workload_selector

_GROUP = re.compile(r"(|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)\Z")
_KIND = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?\Z")
_OUTPUT_HEADER = re.compile(r"[-_A-Za-z0-9]+\Z")


def _pattern(regex: re.Pattern[str], shown: str) -> Any:
    def check(value: str) -> str | None:
        if not regex.match(value):
            return f"Invalid value: {value!r}: should match '{shown}'"
        return None

    return check


def _target_ref_check(w: Walker, path: str, ref: Any) -> None:
    if (ref.get("group") or "", ref["kind"]) not in (("", "Service"), ("core", "Service")):
        w.error(
            f"{path}.kind",
            f"Invalid value: {ref.get('group') or ''}/{ref['kind']}: is not supported as a "
            "policy target (only core/Service)",
        )


_target_ref = obj(
    {
        "group": string(max_len=253, check=_pattern(_GROUP, "^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?…$")),
        "kind": string(
            min_len=1, max_len=63, check=_pattern(_KIND, "^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
        ),
        "name": string(min_len=1, max_len=253),
        "namespace": string(max_len=63),
    },
    required=["kind", "name"],
    checks=[_target_ref_check],
)


def _jwks_uri(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        return f"Invalid value: {value!r}: url must have scheme http:// or https://"
    if not parts.hostname:
        return f"Invalid value: {value!r}: url must have a host"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return f"Invalid value: {value!r}: url has a bad port"
    return None


def _jwks(value: str) -> str | None:
    try:
        doc = json.loads(value)
    except ValueError as exc:
        return f"jwks parse error: not JSON ({exc})"
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return 'jwks parse error: a JWKS is an object with a "keys" list'
    return None


def _timeout(w: Walker, path: str, value: Any) -> None:
    problem = f"Invalid value: {value!r}: must be a valid duration greater than 1ms"
    try:
        ns = parse_duration(value)
    except DurationError:
        w.error(path, problem)
        return
    if ns < 1_000_000:
        w.error(path, problem)


def _output_header(value: str) -> str | None:
    if not _OUTPUT_HEADER.match(value):
        return f"Invalid value: {value!r}: should match '^[-_A-Za-z0-9]+$'"
    return None


def _nonempty(max_len: int = 1024) -> Validator:
    return string(min_len=1, max_len=max_len)


_jwt_header = obj(
    {"name": string(min_len=1, max_len=1024, check=header_name), "prefix": string(max_len=1024)},
    required=["name"],
)

_claim_to_header = obj(
    {"claim": _nonempty(), "header": string(min_len=1, max_len=256, check=_output_header)},
    required=["claim", "header"],
)

_jwt_rule = obj(
    {
        "issuer": _nonempty(4096),
        "audiences": list_of(_nonempty(4096), max_items=256),
        "jwksUri": string(max_len=2048, check=_jwks_uri),
        "jwks": string(max_len=1 << 20, check=_jwks),
        "fromHeaders": list_of(_jwt_header, max_items=64),
        "fromParams": list_of(_nonempty(), max_items=64),
        "fromCookies": list_of(_nonempty(), max_items=64),
        "outputPayloadToHeader": string(min_len=1, max_len=256, check=header_name),
        "forwardOriginalToken": boolean,
        "outputClaimToHeaders": list_of(_claim_to_header, max_items=64),
        "timeout": _timeout,
        "spaceDelimitedClaims": list_of(_nonempty(), max_items=64),
    },
    required=["issuer"],
)


def _spec_check(w: Walker, path: str, spec: Any) -> None:
    present = [k for k in ("selector", "targetRef", "targetRefs") if spec.get(k) is not None]
    if len(present) > 1:
        w.error(path, f"only one of targetRefs or selector can be set (got {', '.join(present)})")


def check_target_namespaces(w: Walker, spec: Any, namespace: str) -> None:
    """A targetRef names a Service of the policy's own namespace (Istio's CRD rule)."""
    refs = [("spec.targetRef", spec.get("targetRef"))]
    refs += [(f"spec.targetRefs[{i}]", r) for i, r in enumerate(spec.get("targetRefs") or [])]
    for path, ref in refs:
        if isinstance(ref, dict) and ref.get("namespace") not in (None, "", namespace):
            w.error(
                f"{path}.namespace",
                f"Invalid value: {ref['namespace']!r}: cross namespace referencing is not "
                "currently supported",
            )


request_authentication_spec: Validator = obj(
    {
        "selector": workload_selector,
        "targetRef": _target_ref,
        "targetRefs": list_of(_target_ref, max_items=16),
        "jwtRules": list_of(_jwt_rule, max_items=4096),
    },
    checks=[_spec_check],
)
