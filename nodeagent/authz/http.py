"""L7 AuthorizationPolicy evaluation (pure): may this HTTP request reach this workload?

Where the request is parsed (the destination agent on HTTP ports, the ingress gateway), every
field of a policy is known, so nothing is widened or dropped as on TCP ports (`evaluate.py`).
Istio's order: CUSTOM is refused at validation; then any matching DENY policy denies; with no
ALLOW policy the request is allowed, otherwise one ALLOW policy must match. A matching AUDIT
policy only marks the request (`audit`). A denied request gets `403 RBAC: access denied`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nodeagent.authn import RequestAuth
from nodeagent.authz.attributes import Connection, HttpFacts
from nodeagent.authz.evaluate import policy_matches
from nodeagent.snapshot.model import AuthorizationPolicies

DENIED_STATUS = 403
DENIED_BODY = "RBAC: access denied"


@dataclass(frozen=True, slots=True)
class HttpAttributes:
    """One request as authorization sees it: its connection (source identity and IP,
    destination IP and port) and the request (host, method, path, headers, the end user)."""

    connection: Connection
    host: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    auth: RequestAuth = field(default_factory=RequestAuth.empty)
    sni: str | None = None
    remote_ip: str | None = None

    def facts(self) -> HttpFacts:
        return HttpFacts(
            host=self.host,
            method=self.method,
            path=self.path,
            headers=self.headers,
            auth=self.auth,
            sni=self.sni,
            remote_ip=self.remote_ip,
        )


@dataclass(frozen=True, slots=True)
class HttpAuthzDecision:
    allowed: bool
    policy: str | None  # "ns/name" of the deciding policy; None: no policy decided
    audit: bool  # an AUDIT policy matched
    reason: str
    audited: tuple[str, ...] = ()  # the AUDIT policies that matched


def evaluate_http(policies: AuthorizationPolicies, attrs: HttpAttributes) -> HttpAuthzDecision:
    conn, req = attrs.connection, attrs.facts()
    audited = tuple(p.ref for p in policies.audit if policy_matches(p, conn, req))
    audit = bool(audited)
    for policy in policies.deny:
        if policy_matches(policy, conn, req):
            return HttpAuthzDecision(False, policy.ref, audit, "denied by DENY policy", audited)
    if not policies.allow:
        return HttpAuthzDecision(True, None, audit, "no ALLOW policy selects the workload", audited)
    for policy in policies.allow:
        if policy_matches(policy, conn, req):
            return HttpAuthzDecision(True, policy.ref, audit, "allowed by ALLOW policy", audited)
    names = ", ".join(p.ref for p in policies.allow)
    return HttpAuthzDecision(False, None, audit, f"no ALLOW policy matched ({names})", audited)
