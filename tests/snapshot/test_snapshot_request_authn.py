"""RequestAuthentication in the snapshot: compiled into typed JwtRules, selected per workload as
Istio selects (namespace-wide, root namespace mesh-wide, selector, targetRef Service), and a
document that does not compile skipped alone."""

from __future__ import annotations

from typing import Any

from corpus import corpus_docs
from helpers_snapshot import Docs
from snapshot_docs import service, workload

from nodeagent.snapshot import Snapshot, SnapshotBuilder
from nodeagent.snapshot.request_authn import ClaimToHeader, JwtHeader, JwtRule
from nodeagent.store.base import KeyValue


def build(kvs: list[KeyValue]) -> Snapshot:
    return SnapshotBuilder.build(kvs, max(kv.mod_revision for kv in kvs)).snapshot


def ra(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def jwt_rule(issuer: str, **more: Any) -> dict[str, Any]:
    return {"issuer": issuer, "jwksUri": f"https://{issuer}/jwks.json", **more}


def test_a_rule_compiles_into_typed_fields() -> None:
    d = Docs()
    spec = {
        "jwtRules": [
            jwt_rule(
                "a.example",
                audiences=["bookinfo"],
                fromHeaders=[{"name": "X-JWT", "prefix": "Token "}],
                fromParams=["jwt"],
                fromCookies=["session"],
                outputPayloadToHeader="X-Payload",
                outputClaimToHeaders=[{"claim": "sub", "header": "X-Sub"}],
                forwardOriginalToken=True,
                timeout="1.5s",
                spaceDelimitedClaims=["roles"],
            ),
            {"issuer": "b.example", "jwks": '{"keys": []}'},
        ]
    }
    kvs = [d.stored(workload("w", "10.0.0.1", {"app": "x"})), d.config(ra("default", "jwt", spec))]
    snap = build(kvs)
    w = snap.workload("w")
    assert w is not None
    first, second = snap.request_authentication_for(w)
    assert first == JwtRule(
        policy="default/jwt",
        issuer="a.example",
        audiences=("bookinfo",),
        jwks_uri="https://a.example/jwks.json",
        from_headers=(JwtHeader("x-jwt", "Token "),),
        from_params=("jwt",),
        from_cookies=("session",),
        output_payload_to_header="x-payload",
        output_claim_to_headers=(ClaimToHeader("sub", "x-sub"),),
        forward_original_token=True,
        timeout=1.5,
        space_delimited_claims=("roles",),
    )
    assert first.headers == (JwtHeader("x-jwt", "Token "),)
    assert first.params == ("jwt",)
    # no location set: Envoy's defaults
    assert second.jwks == '{"keys": []}'
    assert second.headers == (JwtHeader("authorization", "Bearer "),)
    assert second.params == ("access_token",)
    assert second.timeout == 5.0
    assert snap.statistics()["request_authentications"] == 1


def test_selection_namespace_root_selector_and_target_ref() -> None:
    d = Docs()
    kvs = [
        d.stored(workload("a", "10.0.0.1", {"app": "web"}, namespace="shop")),
        d.stored(workload("b", "10.0.0.2", {"app": "db"}, namespace="shop")),
        d.stored(workload("c", "10.0.0.3", {"app": "web"}, namespace="other")),
        d.config(service("web", {"app": "web"}, namespace="shop")),
        d.config(ra("istio-system", "mesh", {"jwtRules": [jwt_rule("mesh")]})),
        d.config(
            ra(
                "istio-system",
                "root-sel",
                {"selector": {"matchLabels": {"app": "web"}}, "jwtRules": [jwt_rule("root-sel")]},
            )
        ),
        d.config(ra("shop", "ns", {"jwtRules": [jwt_rule("shop-ns")]})),
        d.config(
            ra(
                "shop",
                "by-service",
                {
                    "targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                    "jwtRules": [jwt_rule("shop-web")],
                },
            )
        ),
        d.config(
            ra(
                "shop",
                "gone",
                {"targetRef": {"kind": "Service", "name": "absent"}, "jwtRules": [jwt_rule("x")]},
            )
        ),
        d.config(ra("elsewhere", "far", {"jwtRules": [jwt_rule("far")]})),
    ]
    snap = build(kvs)

    def issuers(uid: str) -> list[str]:
        wl = snap.workload(uid)
        assert wl is not None
        return [r.issuer for r in snap.request_authentication_for(wl)]

    # the workload's namespace first (by name), then the root namespace
    assert issuers("a") == ["shop-web", "shop-ns", "mesh", "root-sel"]
    assert issuers("b") == ["shop-ns", "mesh"]
    assert issuers("c") == ["mesh", "root-sel"]
    gateway = snap.request_authentication_for_labels("istio-system", {"istio": "ingressgateway"})
    assert [r.issuer for r in gateway] == ["mesh"]


def test_a_document_that_does_not_compile_is_skipped_alone() -> None:
    d = Docs()
    bad = ra("default", "bad", {"jwtRules": [{"issuer": "x", "timeout": "soon"}]})
    good = ra("default", "good", {"jwtRules": [jwt_rule("good")]})
    kvs = [d.stored(workload("w", "10.0.0.1", {})), d.config(bad), d.config(good)]
    snap = build(kvs)
    w = snap.workload("w")
    assert w is not None
    assert [r.issuer for r in snap.request_authentication_for(w)] == ["good"]
    assert snap.statistics()["skipped"] == 1


def test_removal_updates_the_index() -> None:
    d = Docs()
    doc = d.config(ra("default", "jwt", {"jwtRules": [jwt_rule("a")]}))
    builder = SnapshotBuilder()
    snap = builder.reset([d.stored(workload("w", "10.0.0.1", {})), doc], d.revision)
    w = snap.workload("w")
    assert w is not None
    assert len(snap.request_authentication_for(w)) == 1
    snap = builder.apply([d.delete(doc.key)])
    assert snap.request_authentication_for(w) == ()


def test_the_corpus_valid_case_converts() -> None:
    d = Docs()
    kvs = [d.stored(workload("w", "10.0.0.1", {"app": "foo"}))]
    kvs += [d.config(doc) for doc in corpus_docs("istio/validation-reqauth/reqauth-valid.yaml")]
    kvs.append(d.config(service("foo", {"app": "foo"})))
    snap = build(kvs)
    w = snap.workload("w")
    assert w is not None
    (rule,) = snap.request_authentication_for(w)
    assert (rule.issuer, rule.forward_original_token, rule.timeout) == ("example.com", True, 5.0)
