"""The destination's per-request verdict on real snapshots: L7 AuthorizationPolicy (DENY, then
ALLOW), Istio's RBAC details, and which ports the destination parses as HTTP."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from proxy_docs import config, snapshot, workload

from nodeagent.authn import Authenticator
from nodeagent.authz import DENIED_BODY
from nodeagent.http.guard import RequestFacts, Verdict
from nodeagent.proxy.inbound import Peer, accept_decision
from nodeagent.proxy.l7_guard import check_request as check_async
from nodeagent.proxy.l7_guard import workload_guard
from nodeagent.proxy.outbound import inbound_http_port
from nodeagent.snapshot import Snapshot, Workload

ADMIN = "spiffe://cluster.local/ns/shop/sa/admin"
USER = "spiffe://cluster.local/ns/shop/sa/user"


def ap(name: str, action: str, rules: list[Any]) -> Any:
    return config("AuthorizationPolicy", name, {"action": action, "rules": rules}, "shop")


def build(*extra: Any) -> tuple[Snapshot, Workload]:
    snap = snapshot(workload("web", "10.0.1.1", labels={"app": "web"}, namespace="shop"), *extra)
    me = snap.workload("web")
    assert me is not None
    return snap, me


def check_request(snap: Snapshot, me: Workload, request: RequestFacts) -> Verdict:
    """The verdict, run to completion (no RequestAuthentication here: nothing to fetch)."""
    return trio.run(check_async, snap, me, request, Authenticator())


def facts(method: str, target: str, identity: str | None = USER, **kw: Any) -> RequestFacts:
    return RequestFacts(
        method=method,
        target=target,
        host=kw.pop("host", "web.shop.svc.cluster.local"),
        headers=kw.pop("headers", []),
        port=8080,
        source_ip="10.0.2.2",
        destination_ip="10.0.1.1",
        source_identity=identity,
        mtls=identity is not None,
    )


PUBLIC_AND_ADMIN = (
    ap("public", "ALLOW", [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]}]),
    ap(
        "admin",
        "ALLOW",
        [
            {
                "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/admin"]}}],
                "to": [{"operation": {"methods": ["POST"], "paths": ["/admin"]}}],
            }
        ],
    ),
)


@pytest.mark.parametrize(
    ("method", "target", "identity", "allowed"),
    [
        ("GET", "/public/a?x=1", USER, True),
        ("GET", "/public/a", None, True),  # plaintext: no principal needed for this rule
        ("POST", "/public/a", USER, False),
        ("POST", "/admin", USER, False),
        ("POST", "/admin", ADMIN, True),
        ("POST", "/admin?q", ADMIN, True),  # the query is not part of the path
        ("GET", "/admin", ADMIN, False),
    ],
)
def test_paths_methods_and_principals(
    method: str, target: str, identity: str | None, allowed: bool
) -> None:
    snap, me = build(*PUBLIC_AND_ADMIN)
    verdict = check_request(snap, me, facts(method, target, identity))
    assert verdict.allowed is allowed
    if not allowed:
        assert (verdict.status, verdict.body) == (403, DENIED_BODY.encode())
        assert verdict.details == "rbac_access_denied_matched_policy[none]"


def test_deny_comes_first_and_names_its_rule() -> None:
    deny = ap(
        "no-delete",
        "DENY",
        [
            {"to": [{"operation": {"paths": ["/x"]}}]},
            {"to": [{"operation": {"methods": ["DELETE"]}}]},
        ],
    )
    snap, me = build(*PUBLIC_AND_ADMIN, deny)
    verdict = check_request(snap, me, facts("DELETE", "/public/a"))
    assert not verdict.allowed
    assert verdict.policy == "shop/no-delete"
    assert (
        verdict.details == "rbac_access_denied_matched_policy[ns[shop]-policy[no-delete]-rule[1]]"
    )


def test_header_condition_and_no_policy() -> None:
    snap, me = build()
    assert check_request(snap, me, facts("POST", "/anything")).allowed  # nothing selects it
    snap, me = build(
        ap("hdr", "ALLOW", [{"when": [{"key": "request.headers[x-team]", "values": ["blue"]}]}])
    )
    assert check_request(snap, me, facts("GET", "/", headers=[("x-team", "blue")])).allowed
    assert not check_request(snap, me, facts("GET", "/", headers=[("x-team", "red")])).allowed


def test_request_principals_need_a_token() -> None:
    rule = [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]
    snap, me = build(ap("jwt", "ALLOW", rule))
    assert not check_request(snap, me, facts("GET", "/")).allowed


async def test_workload_guard_reads_the_snapshot_per_request() -> None:
    snap, _ = build(*PUBLIC_AND_ADMIN)
    current = [snap]
    guard = workload_guard(lambda: current[0], lambda s: s.workload("web"), Authenticator())
    assert not (await guard(facts("POST", "/other"))).allowed
    current[0], _ = build()  # the policies are gone
    assert (await guard(facts("POST", "/other"))).allowed
    gone = workload_guard(lambda: current[0], lambda s: None, Authenticator())
    refused = await gone(facts("GET", "/"))
    assert (refused.allowed, refused.status) == (False, 503)
    await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("port", "http"),
    [
        ({"name": "http", "port": 80, "targetPort": 8080}, True),
        ({"name": "http-web", "port": 80, "targetPort": 8080}, True),
        ({"name": "web", "port": 80, "targetPort": 8080, "appProtocol": "http"}, True),
        ({"name": "tcp", "port": 80, "targetPort": 8080}, False),
        ({"name": "grpc", "port": 80, "targetPort": 8080}, True),  # HTTP/2: http2/inbound.py
        ({"name": "web", "port": 80, "targetPort": 8080, "appProtocol": "kubernetes.io/h2c"}, True),
        ({"name": "web", "port": 80, "targetPort": 8080}, False),  # undeclared: sniffed, L4 here
        ({"name": "http", "port": 80, "targetPort": 9090}, False),  # another target port
    ],
)
def test_inbound_http_port_is_the_source_side_rule(port: dict[str, Any], http: bool) -> None:
    svc = config("Service", "web", {"selector": {"app": "web"}, "ports": [port]}, "shop")
    snap, me = build(svc)
    assert (inbound_http_port(snap, me, 8080) is not None) is http


def test_inbound_http_port_needs_a_selecting_service() -> None:
    other = config(
        "Service", "db", {"selector": {"app": "db"}, "ports": [{"name": "http", "port": 80,
                                                                  "targetPort": 8080}]}, "shop",
    )  # fmt: skip
    snap, me = build(other)
    assert inbound_http_port(snap, me, 8080) is None


def test_an_http_connection_is_held_only_to_peer_authentication() -> None:
    """An open HTTP-port connection is re-checked against PeerAuthentication (STRICT closes a
    plaintext one), not against authorization: its requests are authorized one by one, so an
    L7-only rule must not close it (at L4 a DENY with `paths` would match everything)."""
    deny_paths = ap("no-admin", "DENY", [op_paths("/admin")])
    snap, me = build(deny_paths)
    tunnel = Peer("10.0.2.2", "10.0.1.1", 8080, USER, http=True)
    plain = Peer("10.0.2.2", "10.0.1.1", 8080, None, http=True)
    assert accept_decision(snap, me, tunnel).allowed
    assert accept_decision(snap, me, plain).allowed
    assert not accept_decision(snap, me, Peer("10.0.2.2", "10.0.1.1", 8080, USER)).allowed
    strict = config("PeerAuthentication", "strict", {"mtls": {"mode": "STRICT"}}, "shop")
    snap, me = build(deny_paths, strict)
    assert not accept_decision(snap, me, plain).allowed
    assert accept_decision(snap, me, tunnel).allowed


def op_paths(*paths: str) -> dict[str, Any]:
    return {"to": [{"operation": {"paths": list(paths)}}]}
