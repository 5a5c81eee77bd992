"""Authenticator.authenticate with inline JWKS: Istio's outcomes for a request's tokens, and the
header edits handed to the data path."""

from __future__ import annotations

import base64
import json

import pytest
from jwt_helpers import ISSUER, jwks, rule, signing_key, token

from nodeagent.authn import Authenticator, AuthnResult, ClaimToHeader, JwtHeader, RequestAuth
from nodeagent.authn.extract import extract

KEY = signing_key("k1")
INLINE = jwks([KEY])


async def _auth(
    rules: object, path: str = "/", headers: list[tuple[str, str]] | None = None
) -> AuthnResult:
    return await Authenticator().authenticate(rules, "GET", path, headers or [])  # type: ignore[arg-type]


MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"


def _bearer(t: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {t}")]


async def test_no_rules_and_no_token_pass_without_a_principal() -> None:
    assert (await _auth(())).auth == RequestAuth.empty()
    result = await _auth([rule(jwks=INLINE)])
    assert result.auth == RequestAuth.empty()
    assert result.status == 200
    assert result.auth.principal is None


async def test_a_valid_token_gives_the_request_principal_and_claims() -> None:
    t = token(KEY, aud=["bookinfo", "other"], azp="web", groups=["dev"], scope="read write")
    result = await _auth([rule(jwks=INLINE, audiences=("bookinfo",))], headers=_bearer(t))
    assert result.status == 200
    assert result.body == ""
    assert result.auth is not None
    assert result.auth.principal == f"{ISSUER}/user-1"
    assert result.auth.audiences == ("bookinfo", "other")
    assert result.auth.presenter == "web"
    assert result.auth.claims["groups"] == ["dev"]
    assert result.auth.claims["scope"] == ["read", "write"]  # space-delimited by default
    assert result.remove_headers == ("authorization",)  # forwardOriginalToken defaults to false


@pytest.mark.parametrize(
    ("claims", "status", "body"),
    [
        ({"exp": 1000}, 401, "Jwt is expired"),
        ({"iss": "https://evil.example.com"}, 401, "Jwt issuer is not configured"),
        ({"aud": "other"}, 403, "Audiences in Jwt are not allowed"),
    ],
)
async def test_an_invalid_token_is_rejected_with_envoys_status_and_body(
    claims: dict[str, object], status: int, body: str
) -> None:
    t = token(KEY, **claims)
    result = await _auth([rule(jwks=INLINE, audiences=("bookinfo", "other2"))], headers=_bearer(t))
    assert (result.auth, result.status, result.body) == (None, status, body)


async def test_bad_signature_and_unknown_kid_are_401() -> None:
    forged = token(signing_key("other-rsa"), kid="k1")
    result = await _auth([rule(jwks=INLINE)], headers=_bearer(forged))
    assert (result.status, result.body) == (401, "Jwt verification fails")
    stranger = token(signing_key("k9", "ES256"))
    result = await _auth([rule(jwks=INLINE)], headers=_bearer(stranger))
    assert (result.status, result.body) == (401, MISMATCH)
    garbage = await _auth([rule(jwks=INLINE)], headers=_bearer("abc"))
    assert garbage.status == 401
    assert garbage.body.startswith("Jwt is not in the form")


async def test_forward_original_token_keeps_it_and_outputs_are_added() -> None:
    t = token(KEY, groups="dev", n=3, flag=True, nested={"team": "a"}, obj={"x": 1})
    r = rule(
        jwks=INLINE,
        forward_original_token=True,
        output_payload_to_header="x-jwt-payload",
        output_claim_to_headers=(
            ClaimToHeader("groups", "x-groups"),
            ClaimToHeader("n", "x-n"),
            ClaimToHeader("flag", "x-flag"),
            ClaimToHeader("nested.team", "x-team"),
            ClaimToHeader("obj", "x-obj"),  # not a primitive: not copied
            ClaimToHeader("missing", "x-missing"),
        ),
    )
    result = await _auth([r], headers=_bearer(t))
    assert "authorization" not in result.remove_headers
    # the output headers are always removed from the request first: clients cannot forge them
    assert set(result.remove_headers) == {
        "x-jwt-payload", "x-groups", "x-n", "x-flag", "x-team", "x-obj", "x-missing"
    }  # fmt: skip
    added = dict(result.add_headers)
    assert added.pop("x-jwt-payload") == t.split(".")[1]
    payload = json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "=="))
    assert payload["groups"] == "dev"
    assert added == {"x-groups": "dev", "x-n": "3", "x-flag": "true", "x-team": "a"}


async def test_output_headers_are_sanitized_without_a_token_too() -> None:
    r = rule(jwks=INLINE, output_claim_to_headers=(ClaimToHeader("sub", "x-user"),))
    result = await _auth([r], headers=[("x-user", "admin")])
    assert result.auth == RequestAuth.empty()
    assert result.remove_headers == ("x-user",)


async def test_default_locations_are_bearer_header_and_access_token_param() -> None:
    t = token(KEY)
    result = await _auth([rule(jwks=INLINE)], path=f"/api?x=1&access_token={t}")
    assert result.auth is not None
    assert result.auth.principal == f"{ISSUER}/user-1"
    assert result.strip_params == ("access_token",)
    # a custom location replaces the defaults
    custom = rule(jwks=INLINE, from_headers=(JwtHeader("x-jwt", ""),))
    ignored = await _auth([custom], headers=_bearer("not-even-a-token"))
    assert ignored.auth == RequestAuth.empty()
    read = await _auth([custom], headers=[("X-JWT", t)])
    assert read.auth is not None
    assert read.remove_headers == ("x-jwt",)


async def test_header_prefix_params_and_cookies() -> None:
    t = token(KEY)
    r = rule(
        jwks=INLINE,
        from_headers=(JwtHeader("x-auth", "Token "),),
        from_params=("jwt",),
        from_cookies=("session",),
    )
    for headers, path in (
        ([("x-auth", f"Token {t}")], "/"),
        ([], f"/?jwt={t}"),
        ([("cookie", f"a=b; session={t}")], "/"),
    ):
        result = await _auth([r], path=path, headers=headers)
        assert result.auth is not None
        assert result.auth.principal == f"{ISSUER}/user-1"
    assert (await _auth([r], headers=[("x-auth", f"Bearer {t}")])).auth == RequestAuth.empty()


async def test_the_issuer_picks_the_rule_among_those_declaring_the_location() -> None:
    other_key = signing_key("o1", "ES256")
    a = rule(jwks=INLINE)
    b = rule(issuer="https://b.example.com", jwks=jwks([other_key]))
    tb = token(other_key, iss="https://b.example.com", sub="bob")
    result = await _auth([a, b], headers=_bearer(tb))
    assert result.auth is not None
    assert result.auth.principal == "https://b.example.com/bob"
    # b reads only x-b: its token in Authorization is not b's, and a does not know its issuer
    b_only = rule(
        issuer="https://b.example.com", jwks=jwks([other_key]), from_headers=(JwtHeader("x-b"),)
    )
    result = await _auth([a, b_only], headers=_bearer(tb))
    assert (result.status, result.body) == (401, "Jwt issuer is not configured")
    result = await _auth([a, b_only], headers=[("x-b", tb)])
    assert result.auth is not None
    assert result.auth.principal == "https://b.example.com/bob"


async def test_every_token_must_verify() -> None:
    good, expired = token(KEY), token(KEY, exp=1000)
    r = rule(jwks=INLINE, from_headers=(JwtHeader("authorization", "Bearer "), JwtHeader("x-b")))
    result = await _auth([r], headers=[*_bearer(good), ("x-b", expired)])
    assert (result.status, result.body) == (401, "Jwt is expired")
    both = await _auth([r], headers=[*_bearer(good), ("x-b", good)])
    assert both.auth is not None
    assert set(both.remove_headers) == {"authorization", "x-b"}


async def test_a_bad_inline_jwks_fails_requests_with_a_token() -> None:
    result = await _auth([rule(jwks='{"keys": []}')], headers=_bearer(token(KEY)))
    assert (result.status, result.body) == (401, "Jwks doesn't have any valid public key")


def test_extraction_finds_one_token_once_and_remembers_its_rules() -> None:
    t = token(KEY)
    a, b = rule(jwks=INLINE), rule(issuer="https://b", jwks=INLINE)
    found = extract([a, b], f"/?access_token={t}", _bearer(t))
    assert len(found) == 1
    assert found[0].rules == [a, b]
    assert found[0].headers == {"authorization"}
    assert found[0].params == {"access_token"}
    # the JWT ends at the first character no JWT has
    assert extract([a], "/", [("authorization", f"Bearer {t}, more")])[0].value == t
