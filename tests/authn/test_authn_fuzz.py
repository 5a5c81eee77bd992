"""The parsers of outside bytes (tokens, JWKS documents, token locations) never crash: any input
is a named JwtError / JwksError or a result."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from jwt_helpers import rule

from nodeagent.authn.extract import extract
from nodeagent.authn.keyset import JwksError, parse_jwks
from nodeagent.authn.verify import JwtError, parse

_segment = st.one_of(
    st.text(alphabet="ABCDEFabcdef0123456789-_=", max_size=40),
    st.text(max_size=20),
    st.sampled_from(["eyJhbGciOiJSUzI1NiJ9", "e30", "bnVsbA", "WzFd", ""]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_segment, min_size=0, max_size=5))
def test_parse_only_raises_jwt_error(parts: list[str]) -> None:
    try:
        parsed = parse(".".join(parts))
    except JwtError:
        return
    assert parsed.alg


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps({"keys": v}))))
def test_parse_jwks_only_raises_jwks_error(raw: bytes | str) -> None:
    try:
        keys = parse_jwks(raw)
    except JwksError:
        return
    assert keys


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=60),
    st.lists(st.tuples(st.text(max_size=15), st.text(max_size=40)), max_size=5),
)
def test_extract_never_crashes(path: str, headers: list[tuple[str, str]]) -> None:
    r = rule(jwks="{}", from_cookies=("session",))
    for token in extract([r, rule(jwks="{}")], path, headers):
        assert token.value
