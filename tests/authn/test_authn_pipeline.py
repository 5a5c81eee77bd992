"""From YAML to a verdict: a RequestAuthentication and an AuthorizationPolicy applied to a real
store, the agent's snapshot built from it, a JWKS server on loopback, then the authenticator and
the L7 evaluation the destination runs, for the issue's cases (valid, expired, wrong issuer,
wrong audience, bad signature, unknown kid, no token, a claim-based policy)."""

from __future__ import annotations

import trio
from jwt_helpers import ISSUER, JwksServer, jwks, signing_key, token

from nodeagent.authn import Authenticator
from nodeagent.authz import Connection, HttpAttributes, evaluate_http
from nodeagent.config.apply import apply_documents
from nodeagent.config.batch import validate_batch
from nodeagent.config.documents import load_text
from nodeagent.snapshot import Snapshot, SnapshotBuilder, Workload
from nodeagent.store import open_store

KEY, FORGER = signing_key("k1"), signing_key("other-rsa")

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  jwtRules:
  - issuer: "{issuer}"
    jwksUri: "{uri}"
    audiences: [web]
    outputClaimToHeaders: [{{claim: groups, header: x-groups}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [admins]}}]
---
apiVersion: mesh.nodeagent.io/v1alpha1
kind: Workload
metadata: {{name: web-0, uid: uid-web-0, labels: {{app: web}}}}
spec: {{node: node-1, addresses: [10.1.0.7], serviceAccount: web}}
"""


async def _snapshot(text: str) -> Snapshot:
    docs, errors = validate_batch(load_text(text, "policies.yaml"))
    assert errors == []
    store = await open_store("memory://")
    try:
        await apply_documents(store, docs)
        kvs, revision = await store.range("/mesh/v1/")
    finally:
        await store.aclose()
    return SnapshotBuilder.build(kvs, revision).snapshot


async def test_the_issues_cases_from_yaml_to_verdict(nursery: trio.Nursery) -> None:
    server = JwksServer(body=jwks([KEY]))
    await nursery.start(server.run)
    snap = await _snapshot(POLICIES.format(issuer=ISSUER, uri=server.uri))
    web = snap.workload("uid-web-0")
    assert isinstance(web, Workload)
    rules = snap.request_authentication_for(web)
    authn = Authenticator()

    async def request(jwt: str | None) -> tuple[int, str]:
        headers = [("authorization", f"Bearer {jwt}")] if jwt else []
        result = await authn.authenticate(rules, "GET", "/", headers)
        if result.auth is None:
            return result.status, result.body
        attrs = HttpAttributes(
            Connection("10.1.0.5", "10.1.0.7", 8080, "spiffe://cluster.local/ns/default/sa/c"),
            host="web",
            method="GET",
            path="/",
            headers=tuple(headers),
            auth=result.auth,
        )
        decision = evaluate_http(snap.authorization_policies_for(web), attrs)
        return (200, "") if decision.allowed else (403, "RBAC: access denied")

    assert await request(token(KEY, aud="web", groups=["admins"])) == (200, "")
    assert await request(token(KEY, aud="web", groups=["dev"])) == (403, "RBAC: access denied")
    assert await request(None) == (403, "RBAC: access denied")
    assert await request(token(KEY, aud="web", exp=1000)) == (401, "Jwt is expired")
    assert await request(token(KEY, aud="web", iss="https://x.example")) == (
        401,
        "Jwt issuer is not configured",
    )
    assert await request(token(KEY, aud="other")) == (403, "Audiences in Jwt are not allowed")
    assert await request(token(FORGER, kid="k1", aud="web")) == (401, "Jwt verification fails")
    assert await request(token(signing_key("k9", "ES256"), aud="web")) == (
        401,
        "Jwks doesn't have key to match kid or alg from Jwt",
    )
    accepted = await authn.authenticate(
        rules, "GET", "/", [("authorization", f"Bearer {token(KEY, aud='web', groups='ops')}")]
    )
    assert accepted.add_headers == (("x-groups", "ops"),)
    assert "authorization" in accepted.remove_headers
