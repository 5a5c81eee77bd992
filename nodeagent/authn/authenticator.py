"""`Authenticator.authenticate`: a request's tokens verified against the rules that apply to it.

What istiod asks of Envoy for a workload's RequestAuthentications is `requires_any` of one
provider per rule plus `allow_missing`: a request without a token passes (no principal); a
token is verified by the first rule whose issuer is its `iss` among the rules whose locations
it was found in (none: `Jwt issuer is not configured`); every token the request carries must
verify. On success the token's own headers are removed unless `forwardOriginalToken`, and the
rules' `outputPayloadToHeader` / `outputClaimToHeaders` headers are added; those output headers
are always removed from the incoming request first, so a client cannot forge them.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import trio

from nodeagent.authn.extract import Token, extract
from nodeagent.authn.jwks import Connect, JwksCache
from nodeagent.authn.keyset import JwksError
from nodeagent.authn.result import PASS, AuthnResult, RequestAuth
from nodeagent.authn.verify import (
    JwtError,
    ParsedJwt,
    Status,
    check_signature,
    parse,
    verify_claims,
)
from nodeagent.log import get_logger
from nodeagent.snapshot.request_authn import JwtRule

log = get_logger("authn")

# Istio's spaceDelimitedClaims default: these claims are lists of words in one string.
DEFAULT_SPACE_DELIMITED = ("scope", "permission")


class Authenticator:
    """One per agent; owns the JWKS cache. `now` (wall clock seconds) is for tests."""

    def __init__(
        self,
        *,
        http_timeout: float = 5.0,
        refresh_interval: float = 1200.0,
        min_refetch_interval: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        connect: Connect | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.jwks = JwksCache(
            http_timeout=http_timeout,
            refresh_interval=refresh_interval,
            min_refetch_interval=min_refetch_interval,
            ssl_context=ssl_context,
            connect=connect,
        )
        self._now = now

    def statistics(self) -> dict[str, dict[str, object]]:
        """Per JWKS URI: keys held, fetches, failures, the last error (for the admin socket)."""
        return self.jwks.statistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh the remote key sets in use, until cancelled."""
        await self.jwks.run(task_status=task_status)

    async def authenticate(
        self,
        rules: Sequence[JwtRule],
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
    ) -> AuthnResult:
        if not rules:
            return PASS
        sanitize = _output_headers(rules)
        tokens = extract(rules, path, headers)
        if not tokens:
            return AuthnResult(RequestAuth.empty(), 200, "", remove_headers=sanitize)
        verified: list[tuple[Token, JwtRule, ParsedJwt]] = []
        for token in tokens:
            try:
                rule, parsed = await self._verify(token)
            except JwtError as exc:
                # the data path logs the request with this body; this says which rules
                log.debug(
                    "authn.rejected",
                    method=method,
                    reason=exc.status.value,
                    rules=sorted({r.policy for r in token.rules}),
                )
                return AuthnResult.reject(exc.status.http_status, exc.status.value)
            verified.append((token, rule, parsed))
        return _accepted(verified, sanitize)

    async def _verify(self, token: Token) -> tuple[JwtRule, ParsedJwt]:
        parsed = parse(token.value)
        rule = next((r for r in token.rules if r.issuer == parsed.issuer), None)
        if rule is None:
            raise JwtError(Status.UNKNOWN_ISSUER)
        verify_claims(parsed, rule, self._now())
        if rule.jwks is not None:
            try:
                keys = self.jwks.inline(rule.jwks)
            except JwksError:
                raise JwtError(Status.JWKS_NO_VALID_KEYS) from None
            check_signature(parsed, keys)
            return rule, parsed
        if rule.jwks_uri is None:
            raise JwtError(Status.JWKS_NO_VALID_KEYS)
        remote = await self.jwks.keys(rule.jwks_uri, rule.timeout)
        if remote is None:
            raise JwtError(Status.JWKS_FETCH_FAIL)
        try:
            check_signature(parsed, remote)
        except JwtError as exc:
            if exc.status is not Status.KID_ALG_MISMATCH:
                raise
            # a key the cache does not hold yet: the issuer may have rotated
            remote = await self.jwks.refetch_for_unknown_kid(rule.jwks_uri, rule.timeout)
            check_signature(parsed, remote or ())
        return rule, parsed


def _output_headers(rules: Sequence[JwtRule]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for rule in rules:
        if rule.output_payload_to_header:
            out[rule.output_payload_to_header] = None
        for c in rule.output_claim_to_headers:
            out[c.header] = None
    return tuple(out)


def _accepted(
    verified: Sequence[tuple[Token, JwtRule, ParsedJwt]], sanitize: tuple[str, ...]
) -> AuthnResult:
    remove: dict[str, None] = dict.fromkeys(sanitize)
    strip: dict[str, None] = {}
    add: list[tuple[str, str]] = []
    for token, rule, parsed in verified:
        if not rule.forward_original_token:
            remove.update(dict.fromkeys(sorted(token.headers)))
            strip.update(dict.fromkeys(sorted(token.params)))
        if rule.output_payload_to_header:
            add.append((rule.output_payload_to_header, parsed.payload_b64))
        for c in rule.output_claim_to_headers:
            value = claim_text(parsed.payload, c.claim)
            if value:
                add.append((c.header, value))
    _, rule, first = verified[0]
    return AuthnResult(
        auth=request_auth(first.payload, rule.space_delimited_claims),
        status=200,
        body="",
        remove_headers=tuple(remove),
        add_headers=tuple(add),
        strip_params=tuple(strip),
    )


def request_auth(payload: Mapping[str, Any], space_delimited: Sequence[str] = ()) -> RequestAuth:
    """The `request.auth.*` attributes of a verified payload: principal `<iss>/<sub>`,
    audiences, presenter (`azp`), and the claims, space-delimited ones split into words."""
    iss, sub, azp = payload.get("iss"), payload.get("sub"), payload.get("azp")
    aud = payload.get("aud")
    audiences = (
        (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))
    )
    claims = dict(payload)
    for name in (*DEFAULT_SPACE_DELIMITED, *space_delimited):
        value = claims.get(name)
        if isinstance(value, str):
            claims[name] = value.split()
    return RequestAuth(
        principal=f"{iss}/{sub}" if isinstance(iss, str) and isinstance(sub, str) else None,
        audiences=audiences,
        presenter=azp if isinstance(azp, str) else None,
        claims=MappingProxyType(claims),
    )


def claim_text(payload: Mapping[str, Any], claim: str) -> str | None:
    """A claim (`a.b` for nested ones) as Envoy copies it into a header: strings as they are,
    whole numbers without a fraction, booleans as true/false; other types are not copied."""
    value: Any = payload
    for part in claim.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None
