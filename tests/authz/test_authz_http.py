"""L7 AuthorizationPolicy evaluation: every HTTP field, both signs, Istio's order, and the TCP
rule for the same policies on L4."""

from __future__ import annotations

from typing import Any

import pytest
from authz_rules import op, pol, src, when

from nodeagent.authn import RequestAuth
from nodeagent.authz import (
    Connection,
    HttpAttributes,
    authorize,
    evaluate_http,
    l7_only_fields,
    tcp_warning,
)
from nodeagent.snapshot.model import AuthorizationPolicies, AuthorizationPolicy

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
ADMIN = "spiffe://cluster.local/ns/ops/sa/admin"
USER = RequestAuth(
    principal="https://issuer.example.com/user-1",
    audiences=("bookinfo", "api"),
    presenter="web",
    claims={"groups": ["dev", "qa"], "org": {"team": "core"}, "scope": ["read"], "n": 3},
)


def req(
    method: str = "GET",
    path: str = "/",
    *,
    host: str = "productpage.foo.svc.cluster.local:9080",
    identity: str | None = SLEEP,
    auth: RequestAuth | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    port: int = 9080,
    sni: str | None = None,
) -> HttpAttributes:
    return HttpAttributes(
        connection=Connection("10.0.1.5", "10.0.2.7", port, identity),
        host=host,
        method=method,
        path=path,
        headers=headers,
        auth=auth or RequestAuth.empty(),
        sni=sni,
    )


def policies(*ps: AuthorizationPolicy) -> AuthorizationPolicies:
    return AuthorizationPolicies(
        allow=tuple(p for p in ps if p.action == "ALLOW"),
        deny=tuple(p for p in ps if p.action == "DENY"),
        audit=tuple(p for p in ps if p.action == "AUDIT"),
    )


def allowed(rule: dict[str, Any], r: HttpAttributes) -> bool:
    return evaluate_http(policies(pol("ALLOW", rule)), r).allowed


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/public/*", "/public/a/b", True),
        ("/public/*", "/private", False),
        ("*.css", "/static/site.css", True),
        ("/exact", "/exact", True),
        ("/exact", "/exact/", False),
        ("*", "/anything", True),
        ("/api/{*}/items", "/api/v1/items", True),
        ("/api/{*}/items", "/api/v1/v2/items", False),
        ("/api/{*}/items", "/api//items", False),
        ("/files/{**}", "/files/a/b/c.txt", True),
        ("/files/{**}", "/other/a", False),
        ("/admin", "/admin?debug=1", True),  # the query is not part of the path
        ("/admin", "/public/../admin", True),  # dot segments are resolved first
        ("/admin", "/%61dmin", True),  # unreserved escapes decoded
    ],
)
def test_paths(pattern: str, path: str, expected: bool) -> None:
    assert allowed(op(paths=[pattern]), req(path=path)) is expected
    assert allowed(op(notPaths=[pattern]), req(path=path)) is not expected


def test_methods_hosts_and_ports() -> None:
    assert allowed(op(methods=["GET", "HEAD"]), req("GET"))
    assert not allowed(op(methods=["GET"]), req("POST"))
    assert allowed(op(notMethods=["POST"]), req("GET"))
    # hosts: case-insensitive; a pattern without a port ignores the request's port
    assert allowed(op(hosts=["PRODUCTPAGE.foo.svc.cluster.local"]), req())
    assert allowed(op(hosts=["*.svc.cluster.local"]), req())
    assert allowed(op(hosts=["productpage.foo.svc.cluster.local:9080"]), req())
    assert not allowed(op(hosts=["productpage.foo.svc.cluster.local:80"]), req())
    assert not allowed(op(notHosts=["productpage*"]), req())
    assert allowed(op(ports=["9080"]), req())
    assert not allowed(op(ports=["80"]), req())
    assert not allowed(op(notPorts=["9080"]), req())


def test_request_principals_need_a_token() -> None:
    rule = src(requestPrincipals=["*"])
    assert not allowed(rule, req())
    assert allowed(rule, req(auth=USER))
    assert allowed(src(requestPrincipals=["https://issuer.example.com/*"]), req(auth=USER))
    assert not allowed(src(notRequestPrincipals=["*"]), req(auth=USER))
    assert allowed(src(notRequestPrincipals=["*"]), req())


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (when("request.auth.principal", ["https://issuer.example.com/user-1"]), True),
        (when("request.auth.audiences", ["api"]), True),
        (when("request.auth.audiences", ["other"]), False),
        (when("request.auth.presenter", ["web"]), True),
        (when("request.auth.claims[groups]", ["qa"]), True),
        (when("request.auth.claims[groups]", ["admin"]), False),
        (when("request.auth.claims[groups]", None, ["dev"]), False),
        (when("request.auth.claims[org][team]", ["core"]), True),
        (when("request.auth.claims[org][team]", ["edge"]), False),
        (when("request.auth.claims[missing]", ["x"]), False),
        (when("request.auth.claims[n]", ["3"]), False),  # not a string claim
        (when("request.headers[x-user]", ["alice"]), True),
        (when("request.headers[X-User]", ["al*"]), True),
        (when("request.headers[x-none]", ["x"]), False),
        (when("request.headers[x-user]", None, ["bob"]), True),
        (when("source.principal", ["cluster.local/ns/foo/sa/sleep"]), True),
        (when("source.namespace", ["foo"]), True),
        (when("source.ip", ["10.0.1.0/24"]), True),
        (when("destination.ip", ["10.0.2.7"]), True),
        (when("destination.port", ["9080"]), True),
        (when("connection.sni", ["outbound_.9080_._.productpage"]), True),
        (when("experimental.envoy.filters.a.b[c]", ["x"]), False),
    ],
)
def test_when_conditions(rule: dict[str, Any], expected: bool) -> None:
    r = req(auth=USER, headers=(("X-User", "alice"),), sni="outbound_.9080_._.productpage")
    assert allowed(rule, r) is expected


def test_order_deny_then_allow_and_audit_marks() -> None:
    public = pol("ALLOW", op(methods=["GET"], paths=["/public/*"]), name="public")
    admin = "cluster.local/ns/ops/sa/admin"
    admin_ok = pol("ALLOW", {**src(principals=[admin]), **op(paths=["/admin"])}, name="admins")
    no_post = pol(
        "DENY",
        {**src(notPrincipals=[admin]), **op(methods=["POST"], paths=["/admin"])},
        name="no-post",
    )
    audit = pol("AUDIT", op(paths=["/admin"]), name="audit-admin")
    ps = policies(public, admin_ok, no_post, audit)

    d = evaluate_http(ps, req("GET", "/public/index.html"))
    assert (d.allowed, d.policy, d.audit) == (True, "foo/public", False)
    d = evaluate_http(ps, req("POST", "/admin"))
    assert (d.allowed, d.policy, d.audit) == (False, "foo/no-post", True)
    assert d.audited == ("foo/audit-admin",)
    d = evaluate_http(ps, req("POST", "/admin", identity=ADMIN))
    assert (d.allowed, d.policy) == (True, "foo/admins")
    d = evaluate_http(ps, req("GET", "/private"))
    assert (d.allowed, d.policy) == (False, None)
    assert "no ALLOW policy matched" in d.reason
    nothing = evaluate_http(policies(), req("DELETE", "/"))
    assert nothing.allowed
    assert nothing.policy is None


def test_an_allow_policy_without_rules_denies_everything() -> None:
    assert not evaluate_http(policies(pol("ALLOW")), req()).allowed
    assert evaluate_http(policies(pol("DENY")), req()).allowed


def test_the_same_policies_on_a_tcp_port_follow_istios_tcp_rule() -> None:
    conn = Connection("10.0.1.5", "10.0.2.7", 9080, SLEEP)
    allow_get = pol("ALLOW", op(methods=["GET"]), name="get")
    # ALLOW with an HTTP-only field matches nothing on TCP: default deny
    assert not authorize(policies(allow_get), conn).allowed
    assert evaluate_http(policies(allow_get), req("GET")).allowed
    # DENY with an HTTP-only field is widened to its other fields on TCP
    deny_post = pol("DENY", {**op(methods=["POST"]), **src(namespaces=["foo"])}, name="np")
    assert not authorize(policies(deny_post), conn).allowed
    assert authorize(policies(deny_post), Connection("10.0.1.5", "10.0.2.7", 9080, ADMIN)).allowed
    assert evaluate_http(policies(deny_post), req("GET")).allowed


def test_l7_only_fields_are_named_for_the_tcp_warning() -> None:
    spec = {
        "action": "DENY",
        "rules": [
            {
                "from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["a"]}}],
                "to": [{"operation": {"paths": ["/x"], "ports": ["80"]}}],
                "when": [{"key": "request.auth.claims[g]"}, {"key": "source.ip"}],
            }
        ],
    }
    assert l7_only_fields(spec) == [
        "spec.rules[0].from[0].source.requestPrincipals",
        "spec.rules[0].to[0].operation.paths",
        "spec.rules[0].when[0].key (request.auth.claims[g])",
    ]
    assert "widened" in tcp_warning("DENY", "f")
    assert "matches nothing" in tcp_warning("ALLOW", "f")
