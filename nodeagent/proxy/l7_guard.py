"""The per-request security of a parsed HTTP request: RequestAuthentication
(`nodeagent.authn`), then L7 AuthorizationPolicy (`nodeagent.authz.evaluate_http`), as a
`nodeagent.http.guard.Guard`.

Used where a request is parsed for a workload: the destination agent's inbound HTTP
(`inbound_path.py`, the pod's own workload) and the ingress gateway (its workload). Istio's
order: an invalid JWT is refused by authentication (401, or 403 for a wrong audience, with
Envoy's body and `jwt_authn_access_denied{…}` detail); then DENY policies, then ALLOW ones
(deny by default once one selects the workload), AUDIT only reported; a refusal is `403 RBAC:
access denied` with Istio's `rbac_access_denied_matched_policy[…]` detail. The source principal
is the verified tunnel identity of `RequestFacts`, never a header. Authentication's header edits
(the token stripped, claims copied to headers) apply before authorization reads the headers,
as Envoy's filter order has them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from nodeagent.authn import Authenticator, AuthnResult
from nodeagent.authz import (
    DENIED_BODY,
    DENIED_STATUS,
    Connection,
    HttpAttributes,
    HttpAuthzDecision,
    evaluate_http,
)
from nodeagent.authz.evaluate import policy_matches
from nodeagent.http.guard import Guard, RequestFacts, Verdict
from nodeagent.log import get_logger
from nodeagent.snapshot import Snapshot, Workload

log = get_logger("proxy.l7")
_NONE: frozenset[str] = frozenset()


async def check_request(
    snap: Snapshot, workload: Workload, facts: RequestFacts, authenticator: Authenticator
) -> Verdict:
    """The verdict on one request to `workload` (its rules and policies in `snap`)."""
    rules = snap.request_authentication_for(workload)
    authn = await authenticator.authenticate(rules, facts.method, facts.target, facts.headers)
    if authn.auth is None:
        return Verdict(
            False, authn.status, authn.body.encode(), details=_jwt_details(authn), policy=None
        )
    principal = authn.auth.principal
    policies = snap.authorization_policies_for(workload)
    if not (policies.allow or policies.deny or policies.audit):
        # Nothing selects the workload: allowed, without building the request's attributes.
        return _allowed(authn, None, principal, ())
    headers = facts.headers
    if authn.remove_headers or authn.add_headers:
        removed = frozenset(authn.remove_headers)
        headers = [(k, v) for k, v in headers if k not in removed] + list(authn.add_headers)
    conn = Connection(facts.source_ip, facts.destination_ip, facts.port, facts.source_identity)
    attrs = HttpAttributes(
        connection=conn,
        host=facts.host,
        method=facts.method,
        path=facts.target,
        headers=tuple(headers),
        auth=authn.auth,
    )
    decision = evaluate_http(policies, attrs)
    for policy in decision.audited:
        log.info("authz.audit", src=facts.source_ip, path=facts.target, policy=policy)
    if not decision.allowed:
        return Verdict(
            False,
            DENIED_STATUS,
            DENIED_BODY.encode(),
            details=rbac_details(snap, workload, decision, attrs),
            policy=decision.policy,
            request_principal=principal,
            audited=decision.audited,
        )
    return _allowed(authn, decision.policy, principal, decision.audited)


def _allowed(
    authn: AuthnResult, policy: str | None, principal: str | None, audited: tuple[str, ...]
) -> Verdict:
    """Forward, with authentication's header and query edits."""
    return Verdict(
        True,
        policy=policy,
        request_principal=principal,
        remove_headers=frozenset(authn.remove_headers) if authn.remove_headers else _NONE,
        add_headers=authn.add_headers,
        strip_params=frozenset(authn.strip_params) if authn.strip_params else _NONE,
        audited=audited,
    )


def _jwt_details(authn: AuthnResult) -> str:
    """Envoy's response_code_details of a JWT refusal: `jwt_authn_access_denied{Jwt_is_expired}`."""
    return "jwt_authn_access_denied{" + authn.body.replace(" ", "_") + "}"


def rbac_details(
    snap: Snapshot, workload: Workload, decision: HttpAuthzDecision, attrs: HttpAttributes
) -> str:
    """Istio's response_code_details of an RBAC refusal: the DENY policy and the index of its
    first matching rule, or `[none]` when no ALLOW policy matched."""
    if decision.policy is None:
        return "rbac_access_denied_matched_policy[none]"
    ns, _, name = decision.policy.partition("/")
    rule = 0
    for policy in snap.authorization_policies_for(workload).deny:
        if policy.ref == decision.policy:
            conn, facts = attrs.connection, attrs.facts()
            rule = next(
                (
                    i
                    for i, r in enumerate(policy.rules)
                    if policy_matches(dataclasses.replace(policy, rules=(r,)), conn, facts)
                ),
                0,
            )
            break
    return f"rbac_access_denied_matched_policy[ns[{ns}]-policy[{name}]-rule[{rule}]]"


def workload_guard(
    snapshot: Callable[[], Snapshot],
    workload: Callable[[Snapshot], Workload | None],
    authenticator: Authenticator,
) -> Guard:
    """A `Guard` for the workload `workload(snapshot())` names, read per request (a policy
    change applies to the next request of a kept-alive connection)."""

    async def guard(facts: RequestFacts) -> Verdict:
        snap = snapshot()
        me = workload(snap)
        if me is None:
            # Not (or no longer) a workload of the snapshot: nothing to authorize against.
            return Verdict(False, 503, b"no workload", details="no_workload")
        return await check_request(snap, me, facts, authenticator)

    return guard
