"""What the destination (or the gateway) decides for the request itself on a port it parses
(HTTP/1.1, HTTP/2 or gRPC: the agent's own rule, `proxy.outbound.inbound_http_port`): the
L7 AuthorizationPolicy verdict (`authz.evaluate_http`) and whether a JWT is required, with the
RequestAuthentication rules that apply (`snap.request_authentication_for`).

The end user is assumed (`--jwt-principal`, `--jwt-claim`), never verified: explain holds no
keys. An assumed token counts only where a RequestAuthentication accepts its issuer: with none
the data path ignores it, with rules but not its issuer it answers 401 before authorization.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nodeagent.authn import RequestAuth
from nodeagent.authn.verify import Status
from nodeagent.authz import Connection, HttpAttributes, evaluate_http, uses_jwt
from nodeagent.meshctl.explain.inputs import Caller
from nodeagent.proxy.outbound import inbound_http_port
from nodeagent.snapshot import Snapshot, Workload


@dataclass(frozen=True, slots=True)
class HttpView:
    """The request as the destination's agent parses it: after the source's rewrites, with the
    end user `auth` assumed verified."""

    method: str
    authority: str
    path: str
    headers: tuple[tuple[str, str], ...]
    auth: RequestAuth


def http_checks(
    snap: Snapshot, wl: Workload, conn: Connection, http: HttpView, prefix: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The L7 authorization verdict of `http` at workload `wl`, and its JWT requirement."""
    rules = snap.request_authentication_for(wl)
    auth, token = http.auth, "none"
    if auth.principal:
        if not rules:
            auth, token = RequestAuth.empty(), "ignored (no RequestAuthentication applies)"
        elif auth.claims.get("iss") not in {r.issuer for r in rules}:
            token = f"rejected: 401 {Status.UNKNOWN_ISSUER.value}"
        else:
            token = "assumed"
    attrs = HttpAttributes(
        conn,
        host=http.authority,
        method=http.method,
        path=http.path,
        headers=http.headers,
        auth=auth,
    )
    policies = snap.authorization_policies_for(wl)
    decided = evaluate_http(policies, attrs)
    authorization = {
        "decision": "ALLOW" if decided.allowed else "DENY",
        "policy": decided.policy,
        "reason": f"{prefix}; http; {decided.reason}",
        "audited": list(decided.audited),
        "layer": "http",
    }
    if token.startswith("rejected"):
        authorization.update(
            decision="DENY", policy=None, reason=f"{prefix}; http; {token}", audited=[]
        )
    without = evaluate_http(policies, dataclasses.replace(attrs, auth=RequestAuth.empty()))
    jwt = {
        "rules": [{"policy": r.policy, "issuer": r.issuer} for r in rules],
        "token": token,
        # required: a policy reads the JWT and the request is denied without one
        "required": any(uses_jwt(p) for p in (*policies.allow, *policies.deny))
        and not without.allowed,
        "without_token": "ALLOW" if without.allowed else "DENY",
    }
    return authorization, jwt


def add_http_checks(
    snap: Snapshot, destinations: list[dict[str, Any]], caller: Caller, http: HttpView
) -> None:
    """Replace each meshed endpoint's L4 verdict by the request's where its agent parses the
    port (HTTP, HTTP/2, gRPC: authorized per request; an undeclared port stays L4 there),
    unless PeerAuthentication already refused a plaintext caller."""
    for dest in destinations:
        for ep in dest["endpoints"]:
            wl = snap.workload_by_ip(ep["ip"])
            if ep["authorization"] is None or wl is None:
                continue
            if inbound_http_port(snap, wl, ep["port"]) is None:
                continue
            if not caller.identity and ep["mtls_mode"] == "STRICT":
                continue
            conn = Connection(caller.ip or "0.0.0.0", ep["ip"], ep["port"], caller.identity or None)
            prefix = "mtls" if caller.identity else f"mtls={ep['mtls_mode']}"
            ep["authorization"], ep["jwt"] = http_checks(snap, wl, conn, http, prefix)
