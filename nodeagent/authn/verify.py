"""Verify one JWT against one rule and a key set, pure, in Envoy jwt_authn's order and words.

Order (Envoy's `AuthenticatorImpl::startVerify`): parse → issuer → `nbf`/`exp` (60 s clock
skew) → audiences → a key matching `kid`/`alg` → signature. Each failure is a `Status` whose
text is Envoy's (jwt_verify_lib's `getStatusString`), which is what the 401 body says. The
signature itself is checked by PyJWT (on `cryptography`); the parsing around it is here only
to name failures as Envoy does.
"""

from __future__ import annotations

import binascii
import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.api_jwk import PyJWK

from nodeagent.snapshot.request_authn import JwtRule

CLOCK_SKEW = 60  # seconds, Envoy's default (kClockSkewInSecond)

# alg → the key type (and EC curve) that can check it
_ALGS: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
SUPPORTED_ALGS = frozenset(_ALGS)


class Status(enum.Enum):
    """Envoy's verification outcomes that this mesh produces, valued by Envoy's own text."""

    JWT_MISSED = "Jwt is missing"
    JWT_NOT_YET_VALID = "Jwt not yet valid"
    JWT_EXPIRED = "Jwt is expired"
    JWT_BAD_FORMAT = (
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    )
    HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
    HEADER_BAD_JSON = "Jwt header is an invalid JSON"
    HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
    HEADER_NOT_IMPLEMENTED_ALG = "Jwt header [alg] is not supported"
    HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
    PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
    ISS_NOT_STRING = "Jwt payload [iss] field is not a string"
    SUB_NOT_STRING = "Jwt payload [sub] field is not a string"
    IAT_NOT_INTEGER = "Jwt payload [iat] field is not an integer"
    NBF_NOT_INTEGER = "Jwt payload [nbf] field is not an integer"
    EXP_NOT_INTEGER = "Jwt payload [exp] field is not an integer"
    AUD_NOT_STRING = "Jwt payload [aud] field is not a string or string list"
    SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
    UNKNOWN_ISSUER = "Jwt issuer is not configured"
    AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
    VERIFICATION_FAIL = "Jwt verification fails"
    KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
    JWKS_FETCH_FAIL = "Jwks remote fetch is failed"
    JWKS_NO_VALID_KEYS = "Jwks doesn't have any valid public key"

    @property
    def http_status(self) -> int:
        """Envoy answers 403 for a wrong audience and 401 for everything else."""
        return 403 if self is Status.AUDIENCE_NOT_ALLOWED else 401


class JwtError(Exception):
    def __init__(self, status: Status) -> None:
        super().__init__(status.value)
        self.status = status


@dataclass(frozen=True, slots=True)
class ParsedJwt:
    """A token split and decoded, not yet trusted."""

    token: str
    alg: str
    kid: str | None
    payload: Mapping[str, Any]
    payload_b64: str  # the payload segment as sent (outputPayloadToHeader forwards it)

    @property
    def issuer(self) -> str | None:
        iss = self.payload.get("iss")
        return iss if isinstance(iss, str) else None

    @property
    def audiences(self) -> tuple[str, ...]:
        aud = self.payload.get("aud")
        if isinstance(aud, str):
            return (aud,)
        return tuple(aud) if isinstance(aud, list) else ()


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}\Z")


def _b64decode(segment: str, status: Status) -> bytes:
    if not _BASE64URL.match(segment):
        raise JwtError(status)
    try:
        return jwt.utils.base64url_decode(segment.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise JwtError(status) from None


def _json_object(raw: bytes, status: Status) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise JwtError(status) from None
    if not isinstance(value, dict):
        raise JwtError(status)
    return value


def _integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def parse(token: str) -> ParsedJwt:
    """Split and decode `token` as jwt_verify_lib's `Jwt::parseFromString` does."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError(Status.JWT_BAD_FORMAT)
    header = _json_object(_b64decode(parts[0], Status.HEADER_BAD_BASE64), Status.HEADER_BAD_JSON)
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise JwtError(Status.HEADER_BAD_ALG)
    if alg not in SUPPORTED_ALGS:
        raise JwtError(Status.HEADER_NOT_IMPLEMENTED_ALG)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtError(Status.HEADER_BAD_KID)
    payload = _json_object(_b64decode(parts[1], Status.PAYLOAD_BAD_BASE64), Status.PAYLOAD_BAD_JSON)
    for name, status in (("iss", Status.ISS_NOT_STRING), ("sub", Status.SUB_NOT_STRING)):
        if name in payload and not isinstance(payload[name], str):
            raise JwtError(status)
    for name, status in (
        ("iat", Status.IAT_NOT_INTEGER),
        ("nbf", Status.NBF_NOT_INTEGER),
        ("exp", Status.EXP_NOT_INTEGER),
    ):
        if name in payload and not _integer(payload[name]):
            raise JwtError(status)
    aud = payload.get("aud")
    if aud is not None and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise JwtError(Status.AUD_NOT_STRING)
    if not parts[2]:
        raise JwtError(Status.JWT_BAD_FORMAT)
    _b64decode(parts[2], Status.SIGNATURE_BAD_BASE64)
    return ParsedJwt(token=token, alg=alg, kid=kid, payload=payload, payload_b64=parts[1])


def check_time(parsed: ParsedJwt, now: float, skew: int = CLOCK_SKEW) -> None:
    nbf = parsed.payload.get("nbf")
    if nbf is not None and now + skew < nbf:
        raise JwtError(Status.JWT_NOT_YET_VALID)
    exp = parsed.payload.get("exp")
    if exp and now > exp + skew:
        raise JwtError(Status.JWT_EXPIRED)


def _normalize_audience(aud: str) -> str:
    """jwt_verify_lib's CheckAudience: scheme and a trailing slash do not count."""
    for scheme in ("http://", "https://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme) :]
            break
    return aud.removesuffix("/")


def check_audiences(parsed: ParsedJwt, allowed: Sequence[str]) -> None:
    if not allowed:
        return
    wanted = {_normalize_audience(a) for a in allowed}
    if not any(_normalize_audience(a) in wanted for a in parsed.audiences):
        raise JwtError(Status.AUDIENCE_NOT_ALLOWED)


@dataclass(frozen=True, slots=True)
class Key:
    """One usable public key of a JWKS."""

    kid: str | None
    alg: str | None  # the JWK's `alg`, when it names one
    kty: str
    crv: str | None
    jwk: PyJWK


def candidate_keys(parsed: ParsedJwt, keys: Sequence[Key]) -> list[Key]:
    """Envoy's key selection: a JWK's `kid` and `alg`, when set, must equal the token's; its type
    (and curve) must fit the token's `alg`."""
    kty, crv = _ALGS[parsed.alg]
    out = []
    for key in keys:
        if parsed.kid is not None and key.kid is not None and key.kid != parsed.kid:
            continue
        if key.alg is not None and key.alg != parsed.alg:
            continue
        if key.kty != kty or (crv is not None and key.crv != crv):
            continue
        out.append(key)
    return out


def check_signature(parsed: ParsedJwt, keys: Sequence[Key]) -> None:
    candidates = candidate_keys(parsed, keys)
    if not candidates:
        raise JwtError(Status.KID_ALG_MISMATCH)
    for key in candidates:
        try:
            jwt.api_jws.PyJWS().decode_complete(parsed.token, key.jwk.key, algorithms=[parsed.alg])
            return
        except jwt.exceptions.PyJWTError:
            continue
    raise JwtError(Status.VERIFICATION_FAIL)


def verify_claims(parsed: ParsedJwt, rule: JwtRule, now: float) -> None:
    """Everything before the keys: issuer, time, audiences."""
    if parsed.issuer != rule.issuer:
        raise JwtError(Status.UNKNOWN_ISSUER)
    check_time(parsed, now)
    check_audiences(parsed, rule.audiences)
