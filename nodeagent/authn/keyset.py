"""A JWKS document (RFC 7517) → the usable public keys, pure and bounded.

Keys PyJWT cannot load, private or symmetric keys, and keys of types no supported `alg` uses are
left out (as Envoy does); a document with no usable key at all is an error.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
from jwt.api_jwk import PyJWK

from nodeagent.authn.verify import Key

MAX_JWKS = 1 << 20  # bytes: a JWKS is a few KB; anything near this is not one
MAX_KEYS = 256


class JwksError(ValueError):
    """A JWKS that gives no usable key; the message says why."""


def parse_jwks(raw: str | bytes) -> tuple[Key, ...]:
    if len(raw) > MAX_JWKS:
        raise JwksError(f"JWKS is {len(raw)} bytes, over the {MAX_JWKS} byte bound")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksError(f"JWKS is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "keys" not in doc:
        raise JwksError('JWKS has no "keys"')
    entries = doc["keys"]
    if not isinstance(entries, list):
        raise JwksError('"keys" in JWKS is not a list')
    keys = [k for k in (_key(e) for e in entries[:MAX_KEYS]) if k is not None]
    if not keys:
        raise JwksError("JWKS has no usable public key (RSA, or EC P-256/P-384/P-521)")
    return tuple(keys)


def _key(entry: Any) -> Key | None:
    if not isinstance(entry, dict):
        return None
    kty = entry.get("kty")
    if kty not in ("RSA", "EC") or "d" in entry:  # no private keys; no symmetric keys
        return None
    if entry.get("use") not in (None, "sig"):
        return None
    try:
        jwk = PyJWK(entry)
    except (jwt.exceptions.PyJWKError, jwt.exceptions.InvalidKeyError, ValueError, TypeError):
        return None
    kid, alg, crv = entry.get("kid"), entry.get("alg"), entry.get("crv")
    return Key(
        kid=kid if isinstance(kid, str) else None,
        alg=alg if isinstance(alg, str) else None,
        kty=kty,
        crv=crv if isinstance(crv, str) else None,
        jwk=jwk,
    )
