"""RequestAuthentication (security.istio.io) compiled into frozen JWT rules when converted.

A RequestAuthentication says which JWTs a workload accepts: per `jwtRules` entry one `JwtRule`
(issuer, audiences, where the keys come from, where the token is read, what is forwarded). The
data path (`nodeagent.authn.Authenticator`) reads only these typed fields; nothing here parses
a token. Selection follows the other security policies: namespace-wide without a selector,
mesh-wide in the root namespace, a `selector` picks workloads by labels, and a `targetRef(s)` of
kind Service picks the workloads that Service selects (`Snapshot.request_authentication_for`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.config.duration import DurationError, parse_duration

DEFAULT_TIMEOUT = 5.0  # seconds: Istio's default JWKS fetch timeout
BEARER = "Bearer "
DEFAULT_HEADER = "authorization"
DEFAULT_PARAM = "access_token"


class RequestAuthnError(ValueError):
    """A field of a RequestAuthentication that does not compile; `path` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class JwtHeader:
    """Where a token is read from a header: its value after `prefix` (`name` lowercase)."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    claim: str
    header: str  # lowercase


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One `jwtRules` entry of one RequestAuthentication (`policy` is its namespace/name)."""

    policy: str
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None  # inline JWKS (JSON text); wins over jwks_uri as in Istio
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str | None = None  # lowercase
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    forward_original_token: bool = False
    timeout: float = DEFAULT_TIMEOUT  # seconds, for fetching jwks_uri
    space_delimited_claims: tuple[str, ...] = ()

    @property
    def headers(self) -> tuple[JwtHeader, ...]:
        """The header locations, Envoy's default (`Authorization: Bearer`) when none is set."""
        if self.from_headers or self.from_params or self.from_cookies:
            return self.from_headers
        return (JwtHeader(DEFAULT_HEADER, BEARER),)

    @property
    def params(self) -> tuple[str, ...]:
        """The query parameters, Envoy's default (`access_token`) when no location is set."""
        if self.from_headers or self.from_params or self.from_cookies:
            return self.from_params
        return (DEFAULT_PARAM,)


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    namespace: str
    name: str
    selector: Mapping[str, str] | None  # None (and no target_services): namespace-wide
    target_services: tuple[str, ...]  # targetRef(s) of kind Service, by name in `namespace`
    rules: tuple[JwtRule, ...]

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _text(path: str, value: Any, *, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str) or not value:
        raise RequestAuthnError(path, "must be a non-empty string")
    return value


def _seq(path: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise RequestAuthnError(path, f"must be a list, not {type(value).__name__}")
    return list(value)


def _map(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RequestAuthnError(path, f"must be a map, not {type(value).__name__}")
    return value


def _strings(path: str, value: Any) -> tuple[str, ...]:
    return tuple(_text(f"{path}[{i}]", v) for i, v in enumerate(_seq(path, value)))


def compile_jwt_rule(policy: str, path: str, entry: Any) -> JwtRule:
    rule = _map(path, entry)
    timeout = DEFAULT_TIMEOUT
    if rule.get("timeout") is not None:
        try:
            timeout = parse_duration(rule["timeout"]) / 1e9
        except DurationError as exc:
            raise RequestAuthnError(f"{path}.timeout", str(exc)) from None
        if timeout <= 0:
            raise RequestAuthnError(f"{path}.timeout", "must be greater than 0")
    headers = []
    for i, h in enumerate(_seq(f"{path}.fromHeaders", rule.get("fromHeaders"))):
        hp = f"{path}.fromHeaders[{i}]"
        h = _map(hp, h)
        prefix = h.get("prefix") or ""
        if not isinstance(prefix, str):
            raise RequestAuthnError(f"{hp}.prefix", "must be a string")
        headers.append(JwtHeader(_text(f"{hp}.name", h.get("name")).lower(), prefix))
    claims = []
    for i, c in enumerate(_seq(f"{path}.outputClaimToHeaders", rule.get("outputClaimToHeaders"))):
        cp = f"{path}.outputClaimToHeaders[{i}]"
        c = _map(cp, c)
        claims.append(
            ClaimToHeader(
                _text(f"{cp}.claim", c.get("claim")), _text(f"{cp}.header", c.get("header")).lower()
            )
        )
    payload_header = rule.get("outputPayloadToHeader")
    forward = rule.get("forwardOriginalToken", False)
    if not isinstance(forward, bool):
        raise RequestAuthnError(f"{path}.forwardOriginalToken", "must be true or false")
    jwks = rule.get("jwks")
    jwks_uri = rule.get("jwksUri")
    return JwtRule(
        policy=policy,
        issuer=_text(f"{path}.issuer", rule.get("issuer")),
        audiences=_strings(f"{path}.audiences", rule.get("audiences")),
        jwks_uri=None if jwks_uri is None else _text(f"{path}.jwksUri", jwks_uri),
        jwks=None if jwks is None else _text(f"{path}.jwks", jwks),
        from_headers=tuple(headers),
        from_params=_strings(f"{path}.fromParams", rule.get("fromParams")),
        from_cookies=_strings(f"{path}.fromCookies", rule.get("fromCookies")),
        output_payload_to_header=None
        if payload_header is None
        else _text(f"{path}.outputPayloadToHeader", payload_header).lower(),
        output_claim_to_headers=tuple(claims),
        forward_original_token=forward,
        timeout=timeout,
        space_delimited_claims=_strings(
            f"{path}.spaceDelimitedClaims", rule.get("spaceDelimitedClaims")
        ),
    )


def compile_request_authentication(
    namespace: str, name: str, spec: Mapping[str, Any], selector: Mapping[str, str] | None
) -> RequestAuthentication:
    """The typed form of one RequestAuthentication spec (`selector` already read by the
    caller); RequestAuthnError naming the first field that does not compile."""
    ref = f"{namespace}/{name}"
    refs = _seq("spec.targetRefs", spec.get("targetRefs"))
    paths = [f"spec.targetRefs[{i}]" for i in range(len(refs))]
    if spec.get("targetRef") is not None:
        refs.append(spec["targetRef"])
        paths.append("spec.targetRef")
    services = []
    for path, target in zip(paths, refs, strict=True):
        target = _map(path, target)
        kind = target.get("kind")
        if kind != "Service" or target.get("group", "") not in ("", "core"):
            raise RequestAuthnError(f"{path}.kind", f"{kind!r} is not supported (only Service)")
        services.append(_text(f"{path}.name", target.get("name")))
    rules = tuple(
        compile_jwt_rule(ref, f"spec.jwtRules[{i}]", r)
        for i, r in enumerate(_seq("spec.jwtRules", spec.get("jwtRules")))
    )
    return RequestAuthentication(
        namespace=namespace,
        name=name,
        selector=selector,
        target_services=tuple(dict.fromkeys(services)),
        rules=rules,
    )
