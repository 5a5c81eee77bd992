"""End-user authentication: RequestAuthentication's JWTs verified as Istio (Envoy's jwt_authn) does.

The data path (the destination agent for HTTP ports, the ingress gateway) asks the snapshot for
the rules that apply (`snap.request_authentication_for(workload)`, a tuple of `JwtRule`), then:

    result = await authenticator.authenticate(rules, method, path, headers)
    if result.auth is None:
        answer result.status (401, 403 for a wrong audience) with body result.body
    else:
        drop result.remove_headers (lowercase names), then add result.add_headers,
        remove the query parameters result.strip_params from the path,
        and hand result.auth (a RequestAuth) to authorization and telemetry.

`Authenticator` (one per agent) owns the JWKS cache; start `run()` in a nursery
(`await nursery.start(authenticator.run)`) to refresh remote key sets on an interval
(`http_timeout` bounds each refresh; a request waits at most its rule's `timeout`).
`statistics()` tells, per JWKS URI, the keys held, fetches, failures and the last error.
`authenticate` awaits only to fetch keys (bounded by the rule's `timeout`), otherwise it is a
pure decision. With no rules every request passes with `RequestAuth.empty()`.

Semantics (Envoy's `requires_any` of every rule plus `allow_missing`, which is what istiod
generates): no token passes with no request principal; every token found must verify against
the rule of its issuer whose locations it was found in; the first failure rejects the request
with Envoy's status string (`Jwt is expired`, `Jwt issuer is not configured`, …, see
`verify.Status`). The request principal is `<iss>/<sub>`. See docs/security.md.
"""

from __future__ import annotations

from nodeagent.authn.authenticator import Authenticator
from nodeagent.authn.result import AuthnResult, RequestAuth
from nodeagent.snapshot.request_authn import ClaimToHeader, JwtHeader, JwtRule

__all__ = ["Authenticator", "AuthnResult", "ClaimToHeader", "JwtHeader", "JwtRule", "RequestAuth"]
