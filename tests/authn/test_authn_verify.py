"""One token against one rule and key set: Envoy's order of checks and its status strings."""

from __future__ import annotations

import base64
import json
import time

import pytest
from jwt_helpers import ISSUER, jwks, rule, signing_key, token

from nodeagent.authn.keyset import JwksError, parse_jwks
from nodeagent.authn.verify import (
    JwtError,
    Status,
    check_signature,
    parse,
    verify_claims,
)

NOW = time.time()


def _b64(obj: object) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _status(call: object) -> Status:
    with pytest.raises(JwtError) as info:
        call()  # type: ignore[operator]
    return info.value.status


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "ES512"])
def test_every_supported_algorithm_verifies(alg: str) -> None:
    key = signing_key(f"k-{alg}", alg)
    parsed = parse(token(key))
    verify_claims(parsed, rule(), NOW)
    check_signature(parsed, parse_jwks(jwks([key])))  # raises on failure


def test_a_signature_by_another_key_fails_verification() -> None:
    good, forger = signing_key("k1"), signing_key("other-rsa")
    forged = token(forger, kid="k1")
    assert _status(lambda: check_signature(parse(forged), parse_jwks(jwks([good])))) is (
        Status.VERIFICATION_FAIL
    )
    assert Status.VERIFICATION_FAIL.value == "Jwt verification fails"


def test_an_unknown_kid_or_a_key_of_another_type_is_a_kid_alg_mismatch() -> None:
    keys = parse_jwks(jwks([signing_key("k1")]))
    unknown = parse(token(signing_key("k2")))
    assert _status(lambda: check_signature(unknown, keys)) is Status.KID_ALG_MISMATCH
    ec_token = parse(token(signing_key("k1", "ES256")))  # same kid, but an EC token
    assert _status(lambda: check_signature(ec_token, keys)) is Status.KID_ALG_MISMATCH
    assert Status.KID_ALG_MISMATCH.value == "Jwks doesn't have key to match kid or alg from Jwt"


def test_a_token_without_kid_tries_every_key_of_its_type() -> None:
    key = signing_key("k1")
    keys = parse_jwks(jwks([signing_key("k0", "ES256"), key]))
    check_signature(parse(token(key, kid=None)), keys)


@pytest.mark.parametrize(
    ("claims", "status", "text"),
    [
        ({"exp": int(NOW) - 61}, Status.JWT_EXPIRED, "Jwt is expired"),
        ({"nbf": int(NOW) + 120}, Status.JWT_NOT_YET_VALID, "Jwt not yet valid"),
        ({"iss": "https://evil.example"}, Status.UNKNOWN_ISSUER, "Jwt issuer is not configured"),
        ({"aud": "other"}, Status.AUDIENCE_NOT_ALLOWED, "Audiences in Jwt are not allowed"),
        ({"aud": None}, Status.AUDIENCE_NOT_ALLOWED, "Audiences in Jwt are not allowed"),
    ],
)
def test_claims_are_checked_with_envoys_words(
    claims: dict[str, object], status: Status, text: str
) -> None:
    parsed = parse(token(signing_key("k1"), **claims))
    assert _status(lambda: verify_claims(parsed, rule(audiences=("bookinfo",)), NOW)) is status
    assert status.value == text


def test_the_clock_skew_is_sixty_seconds() -> None:
    key = signing_key("k1")
    verify_claims(parse(token(key, exp=int(NOW) - 50)), rule(), NOW)
    verify_claims(parse(token(key, nbf=int(NOW) + 50)), rule(), NOW)


def test_issuer_is_checked_before_time_and_time_before_audience() -> None:
    key = signing_key("k1")
    both = parse(token(key, iss="x", exp=int(NOW) - 1000, aud="other"))
    assert _status(lambda: verify_claims(both, rule(audiences=("a",)), NOW)) is (
        Status.UNKNOWN_ISSUER
    )
    late = parse(token(key, exp=int(NOW) - 1000, aud="other"))
    assert _status(lambda: verify_claims(late, rule(audiences=("a",)), NOW)) is Status.JWT_EXPIRED


def test_audiences_ignore_scheme_and_trailing_slash_and_any_one_suffices() -> None:
    parsed = parse(token(signing_key("k1"), aud=["x", "https://api.example.com/"]))
    verify_claims(parsed, rule(audiences=("api.example.com",)), NOW)
    verify_claims(parsed, rule(audiences=("http://x",)), NOW)


def test_a_wrong_audience_is_403_everything_else_401() -> None:
    assert Status.AUDIENCE_NOT_ALLOWED.http_status == 403
    assert {s.http_status for s in Status if s is not Status.AUDIENCE_NOT_ALLOWED} == {401}


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("abc", Status.JWT_BAD_FORMAT),
        ("a.b.c.d", Status.JWT_BAD_FORMAT),
        ("!!!." + _b64({}) + ".c2ln", Status.HEADER_BAD_BASE64),
        (_b64(b"not json") + "." + _b64({}) + ".c2ln", Status.HEADER_BAD_JSON),
        (_b64({"typ": "JWT"}) + "." + _b64({}) + ".c2ln", Status.HEADER_BAD_ALG),
        (_b64({"alg": "none"}) + "." + _b64({}) + ".c2ln", Status.HEADER_NOT_IMPLEMENTED_ALG),
        (_b64({"alg": "HS256"}) + "." + _b64({}) + ".c2ln", Status.HEADER_NOT_IMPLEMENTED_ALG),
        (_b64({"alg": "RS256", "kid": 3}) + "." + _b64({}) + ".c2ln", Status.HEADER_BAD_KID),
        (_b64({"alg": "RS256"}) + "." + _b64(b"[1]") + ".c2ln", Status.PAYLOAD_BAD_JSON),
        (_b64({"alg": "RS256"}) + "." + _b64({"iss": 1}) + ".c2ln", Status.ISS_NOT_STRING),
        (_b64({"alg": "RS256"}) + "." + _b64({"exp": "x"}) + ".c2ln", Status.EXP_NOT_INTEGER),
        (_b64({"alg": "RS256"}) + "." + _b64({"aud": [1]}) + ".c2ln", Status.AUD_NOT_STRING),
        (_b64({"alg": "RS256"}) + "." + _b64({}) + ".", Status.JWT_BAD_FORMAT),
        (_b64({"alg": "RS256"}) + "." + _b64({}) + ".!!", Status.SIGNATURE_BAD_BASE64),
    ],
)
def test_malformed_tokens_are_named_as_envoy_names_them(raw: str, status: Status) -> None:
    assert _status(lambda: parse(raw)) is status


def test_a_jwks_without_usable_keys_is_an_error_and_private_keys_are_ignored() -> None:
    with pytest.raises(JwksError, match="not JSON"):
        parse_jwks("{")
    with pytest.raises(JwksError, match='no "keys"'):
        parse_jwks("{}")
    with pytest.raises(JwksError, match="no usable public key"):
        parse_jwks(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}, {"kty": "RSA"}]}))
    private = signing_key("k1").jwk() | {"d": "AQAB"}
    with pytest.raises(JwksError, match="no usable public key"):
        parse_jwks(json.dumps({"keys": [private]}))
    assert [k.kid for k in parse_jwks(jwks([signing_key("a"), signing_key("b", "ES256")]))] == [
        "a",
        "b",
    ]
    assert ISSUER.startswith("https://")
