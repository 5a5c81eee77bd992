"""AuthorizationPolicy evaluation (pure): does this connection, or this HTTP request, get in?

`authorize(policies, conn)` takes the policies the snapshot selects for the destination workload
(`snap.authorization_policies_for(workload)`) and a connection's L4 attributes, and returns an
`AuthzDecision`: what TCP ports get, with ztunnel's semantics (`rbac.rs`) and Istio's TCP rule
for HTTP-only fields. `evaluate_http(policies, attrs)` takes an HTTP request's `HttpAttributes`
(its connection, host, method, path, headers and the `authn.RequestAuth` of its JWT) and returns
an `HttpAuthzDecision` (denied: `403 RBAC: access denied`). See docs/security.md.
"""

from __future__ import annotations

from nodeagent.authz.attributes import Connection, HttpFacts
from nodeagent.authz.evaluate import AuthzDecision, authorize
from nodeagent.authz.fields import l7_only_fields, reads_requests, tcp_warning, uses_jwt
from nodeagent.authz.http import (
    DENIED_BODY,
    DENIED_STATUS,
    HttpAttributes,
    HttpAuthzDecision,
    evaluate_http,
)

__all__ = [
    "DENIED_BODY",
    "DENIED_STATUS",
    "AuthzDecision",
    "Connection",
    "HttpAttributes",
    "HttpAuthzDecision",
    "HttpFacts",
    "authorize",
    "evaluate_http",
    "l7_only_fields",
    "reads_requests",
    "tcp_warning",
    "uses_jwt",
]
