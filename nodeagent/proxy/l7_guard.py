"""The per-request security of a parsed HTTP request (pure, but for the authenticator's key
fetch): RequestAuthentication, then L7 AuthorizationPolicy, as a `nodeagent.http.guard.Guard`.

Used where a request is parsed for a workload: the destination agent's inbound HTTP
(`inbound_path.py`, the pod's own workload) and the ingress gateway (its workload). Istio's
order: an invalid JWT is 401 with authentication's body; then DENY policies, then ALLOW ones
(deny by default once one selects the workload), AUDIT only reported; a refusal is `403 RBAC:
access denied` with Istio's `rbac_access_denied_matched_policy[…]` detail. The source
principal is the verified tunnel identity of `RequestFacts` (never a header).
"""

from __future__ import annotations

from collections.abc import Callable

from nodeagent.authz import Connection
from nodeagent.http.guard import RBAC_DENIED_BODY, Guard, RequestFacts, Verdict
from nodeagent.http.headers import joined
from nodeagent.log import get_logger
from nodeagent.proxy.l7_authz_shim import HttpAttributes, HttpAuthzDecision, evaluate_http
from nodeagent.snapshot import Snapshot, Workload

log = get_logger("proxy.l7")


def check_request(snap: Snapshot, workload: Workload, facts: RequestFacts) -> Verdict:
    """The verdict on one request to `workload` (its policies in `snap`)."""
    conn = Connection(facts.source_ip, facts.destination_ip, facts.port, facts.source_identity)
    attrs = HttpAttributes(
        conn=conn,
        method=facts.method,
        path=facts.target.partition("?")[0],
        host=facts.host,
        headers=joined(list(facts.headers)),
    )
    decision = evaluate_http(snap.authorization_policies_for(workload), attrs)
    for policy in decision.audit:
        log.info("authz.audit", src=facts.source_ip, path=attrs.path, policy=policy)
    if not decision.allowed:
        return Verdict(
            False,
            403,
            RBAC_DENIED_BODY,
            details=rbac_details(snap, decision),
            policy=decision.policy,
            audited=decision.audit,
        )
    return Verdict(True, policy=decision.policy, audited=decision.audit)


def rbac_details(snap: Snapshot, decision: HttpAuthzDecision) -> str:
    """Istio's response_code_details of an RBAC refusal: the DENY policy and rule that matched,
    or `[none]` when no ALLOW policy matched."""
    if decision.policy is None:
        return "rbac_access_denied_matched_policy[none]"
    ns, _, name = decision.policy.partition("/")
    return f"rbac_access_denied_matched_policy[ns[{ns}]-policy[{name}]-rule[{decision.rule}]]"


def workload_guard(
    snapshot: Callable[[], Snapshot], workload: Callable[[Snapshot], Workload | None]
) -> Guard:
    """A `Guard` for the workload `workload(snapshot())` names, read per request (a policy
    change applies to the next request of a kept-alive connection)."""

    async def guard(facts: RequestFacts) -> Verdict:
        snap = snapshot()
        me = workload(snap)
        if me is None:
            # Not (or no longer) a workload of the snapshot: nothing to authorize against.
            return Verdict(False, 503, b"no workload", details="no_workload")
        return check_request(snap, me, facts)

    return guard
