"""Inbound decisions on real snapshots: PeerAuthentication levels and ports, then authorization."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from proxy_docs import config, snapshot, workload

from nodeagent.identity.api import PeerRejected
from nodeagent.proxy.inbound import (
    DESTINATION_L7_ANNOTATION,
    InboundDecision,
    LiveConnection,
    LiveConnections,
    Peer,
    accept_decision,
    destination_l7_annotation,
    destination_l7_of,
    parses_requests,
    plaintext_decision,
    tunnel_decision,
)
from nodeagent.snapshot import Snapshot, Workload

CLIENT = "spiffe://cluster.local/ns/other/sa/client"


def pa(name: str, ns: str, mode: str | None, selector: dict[str, str] | None = None,
       ports: dict[str, str] | None = None) -> Any:  # fmt: skip
    spec: dict[str, Any] = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return config("PeerAuthentication", name, spec, ns)


def build(*extra: Any) -> tuple[Snapshot, Workload]:
    snap = snapshot(workload("web", "10.0.1.1", labels={"app": "web"}, namespace="shop"), *extra)
    me = snap.workload("web")
    assert me is not None
    return snap, me


def plain(snap: Snapshot, me: Workload, port: int = 8080) -> bool:
    return plaintext_decision(snap, me, "10.0.9.9", "10.0.1.1", port).allowed


def test_default_is_permissive() -> None:
    assert plain(*build())


@pytest.mark.parametrize(
    ("policies", "port", "allowed"),
    [
        ([pa("mesh", "istio-system", "STRICT")], 8080, False),
        ([pa("mesh", "istio-system", "PERMISSIVE")], 8080, True),
        ([pa("mesh", "istio-system", "DISABLE")], 8080, True),
        ([pa("mesh", "istio-system", "STRICT"), pa("ns", "shop", "PERMISSIVE")], 8080, True),
        ([pa("mesh", "istio-system", "PERMISSIVE"), pa("ns", "shop", "STRICT")], 8080, False),
        ([pa("ns", "shop", "STRICT"), pa("w", "shop", "PERMISSIVE", {"app": "web"})], 8080, True),
        ([pa("ns", "shop", "STRICT"), pa("w", "shop", None, {"app": "web"})], 8080, False),
        ([pa("ns", "shop", "STRICT"), pa("w", "shop", "UNSET", {"app": "db"})], 8080, False),
        ([pa("ns", "other", "STRICT")], 8080, True),  # another namespace does not apply
        ([pa("w", "shop", "STRICT", {"app": "web"}, {"9090": "PERMISSIVE"})], 9090, True),
        ([pa("w", "shop", "STRICT", {"app": "web"}, {"9090": "PERMISSIVE"})], 8080, False),
        ([pa("w", "shop", "PERMISSIVE", {"app": "web"}, {"9090": "STRICT"})], 9090, False),
        ([pa("w", "shop", "PERMISSIVE", {"app": "web"}, {"9090": "DISABLE"})], 9090, True),
    ],
)
def test_peer_authentication_levels(policies: list[Any], port: int, allowed: bool) -> None:
    snap, me = build(*policies)
    decision = plaintext_decision(snap, me, "10.0.9.9", "10.0.1.1", port)
    assert decision.allowed is allowed
    if not allowed:
        assert "STRICT" in decision.reason


def ap(name: str, ns: str, action: str, rules: list[Any] | None,
       selector: dict[str, str] | None = None) -> Any:  # fmt: skip
    spec: dict[str, Any] = {"action": action}
    if rules is not None:
        spec["rules"] = rules
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return config("AuthorizationPolicy", name, spec, ns)


def test_permissive_plaintext_still_goes_through_authorization() -> None:
    snap, me = build(
        ap("only-mesh", "shop", "ALLOW", [{"from": [{"source": {"principals": ["*"]}}]}])
    )
    d = plaintext_decision(snap, me, "10.0.9.9", "10.0.1.1", 8080)
    assert not d.allowed
    assert d.policy == "shop/only-mesh"
    t = tunnel_decision(snap, me, "10.0.9.9", "10.0.1.1", 8080, CLIENT)
    assert t.allowed


def test_root_namespace_policy_applies_mesh_wide_and_selector_scopes() -> None:
    deny_all_other = ap("deny-other", "istio-system", "DENY",
                        [{"from": [{"source": {"namespaces": ["other"]}}]}])  # fmt: skip
    snap, me = build(deny_all_other)
    d = tunnel_decision(snap, me, "10.0.9.9", "10.0.1.1", 8080, CLIENT)
    assert (d.allowed, d.policy) == (False, "istio-system/deny-other")
    snap, me = build(ap("x", "shop", "DENY", [{}], selector={"app": "db"}))
    assert tunnel_decision(snap, me, "10.0.9.9", "10.0.1.1", 8080, CLIENT).allowed
    snap, me = build(ap("x", "shop", "DENY", [{}], selector={"app": "web"}))
    assert not tunnel_decision(snap, me, "10.0.9.9", "10.0.1.1", 8080, CLIENT).allowed


# -- open connections re-checked on a policy change ------------------------------------------


OTHER = "spiffe://cluster.local/ns/shop/sa/frontend"
DENY_OTHER_NS = [{"from": [{"source": {"namespaces": ["other"]}}]}]


class Closer:
    """Records the decisions a connection was closed with (the proxy cancels its relay)."""

    def __init__(self) -> None:
        self.calls: list[InboundDecision] = []

    def __call__(self, decision: InboundDecision) -> None:
        self.calls.append(decision)


def live(cid: int, peer: Peer) -> tuple[LiveConnection, Closer]:
    closer = Closer()
    return LiveConnection(cid, peer, closer), closer


def tunnel_peer(identity: str = CLIENT, cert: bytes = b"") -> Peer:
    return Peer("10.0.9.9", "10.0.1.1", 8080, identity, cert, 40000)


def test_decide_again_is_the_accept_decision() -> None:
    snap, me = build(ap("deny", "shop", "DENY", DENY_OTHER_NS), pa("ns", "shop", "STRICT"))
    t = accept_decision(snap, me, tunnel_peer())
    assert t == tunnel_decision(snap, me, "10.0.9.9", "10.0.1.1", 8080, CLIENT)
    assert (t.allowed, t.policy) == (False, "shop/deny")
    p = accept_decision(snap, me, Peer("10.0.9.9", "10.0.1.1", 8080))
    assert p == plaintext_decision(snap, me, "10.0.9.9", "10.0.1.1", 8080)
    assert not p.allowed
    assert "STRICT" in p.reason


def test_sweep_closes_only_the_connections_now_denied() -> None:
    registry = LiveConnections()
    denied, denied_closer = live(1, tunnel_peer(CLIENT))
    kept, kept_closer = live(2, tunnel_peer(OTHER))
    for c in (denied, kept):
        registry.add(c)
    snap, me = build()
    assert registry.sweep(snap, me) == []  # nothing changed: nothing closed

    snap, me = build(ap("deny", "shop", "DENY", DENY_OTHER_NS))
    closed = registry.sweep(snap, me)
    assert [(c.conn.cid, c.cause, c.decision.policy) for c in closed] == [
        (1, "policy", "shop/deny")
    ]
    assert [d.policy for d in denied_closer.calls] == ["shop/deny"]
    assert kept_closer.calls == []
    assert denied.closed_by is not None
    assert kept.closed_by is None
    assert (len(registry), registry.closed_by_policy) == (1, 1)
    # A second sweep does not close (or count) the same connection twice.
    assert registry.sweep(snap, me) == []
    assert len(denied_closer.calls) == 1
    assert registry.closed_by_policy == 1


def test_unrelated_policy_keeps_connections() -> None:
    registry = LiveConnections()
    conn, closer = live(1, tunnel_peer())
    registry.add(conn)
    snap, me = build(
        ap("other-app", "shop", "DENY", [{}], selector={"app": "db"}),
        ap("elsewhere", "prod", "DENY", [{}]),
        ap("allow-other", "shop", "ALLOW", [{"from": [{"source": {"namespaces": ["other"]}}]}]),
    )
    assert registry.sweep(snap, me) == []
    assert closer.calls == []
    assert len(registry) == 1


def test_strict_closes_open_plaintext_but_not_tunnels() -> None:
    registry = LiveConnections()
    plain_conn, plain_closer = live(1, Peer("10.0.9.9", "10.0.1.1", 8080, src_port=41000))
    tunnel_conn, tunnel_closer = live(2, tunnel_peer())
    registry.add(plain_conn)
    registry.add(tunnel_conn)
    snap, me = build(pa("ns", "shop", "STRICT"))
    closed = registry.sweep(snap, me)
    assert [c.conn.cid for c in closed] == [1]
    assert "STRICT" in plain_closer.calls[0].reason
    assert tunnel_closer.calls == []


def test_revoked_peer_certificate_is_closed_when_checked() -> None:
    revoked: set[bytes] = set()

    def peer_check(cert: bytes) -> str:
        if cert in revoked:
            raise PeerRejected("certificate serial 1f is revoked")
        return CLIENT

    registry = LiveConnections()
    a, a_closer = live(1, tunnel_peer(cert=b"cert-a"))
    b, b_closer = live(2, tunnel_peer(cert=b"cert-b"))
    registry.add(a)
    registry.add(b)
    snap, me = build()
    assert registry.sweep(snap, me, peer_check) == []
    revoked.add(b"cert-a")
    assert registry.sweep(snap, me) == []  # a policy-only sweep does not look at certificates
    closed = registry.sweep(snap, me, peer_check)
    assert [(c.conn.cid, c.cause) for c in closed] == [(1, "revoked")]
    assert "revoked" in a_closer.calls[0].reason
    assert b_closer.calls == []


def test_check_one_and_remove() -> None:
    registry = LiveConnections()
    conn, closer = live(7, tunnel_peer())
    registry.add(conn)
    snap, me = build(ap("deny", "shop", "DENY", DENY_OTHER_NS))
    got = registry.check(conn, snap, me)
    assert got is not None
    assert got.conn is conn
    assert len(registry) == 0
    assert len(closer.calls) == 1
    registry.remove(conn)  # the connection's own cleanup: harmless after a close
    assert len(registry) == 0


# -- whether the destination parses a tunnelled HTTP port's requests (--destination-l7) -------


def _parses(
    snap: Snapshot, me: Workload, *, mode: str = "when-needed", reported: bool = True
) -> bool:
    return parses_requests(snap, me, mode=mode, source_reported=reported)  # type: ignore[arg-type]


def test_always_parses_whatever_the_source_or_policy() -> None:
    snap, me = build()
    assert _parses(snap, me, mode="always")
    assert _parses(snap, me, mode="always", reported=False)


def test_when_needed_relays_what_the_source_reports_under_l4_policy_only() -> None:
    rule = {"from": [{"source": {"principals": ["*"]}}], "to": [{"operation": {"ports": ["8080"]}}]}
    l4_only = ap("mesh-only", "shop", "ALLOW", [rule])
    snap, me = build(l4_only)
    assert not _parses(snap, me)
    # A source that did not parse (an L4 relay: a pod IP, a headless Service) is parsed here.
    assert _parses(snap, me, reported=False)


@pytest.mark.parametrize(
    "doc",
    [
        ap("paths", "shop", "ALLOW", [{"to": [{"operation": {"paths": ["/api/*"]}}]}]),
        ap("methods", "shop", "DENY", [{"to": [{"operation": {"methods": ["DELETE"]}}]}]),
        ap("jwt", "shop", "ALLOW", [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]),
        ap(
            "header",
            "shop",
            "AUDIT",
            [{"when": [{"key": "request.headers[x-a]", "values": ["1"]}]}],
        ),
        # mesh-wide, from the root namespace
        ap("root", "istio-system", "DENY", [{"to": [{"operation": {"hosts": ["evil"]}}]}]),
        config("RequestAuthentication", "jwt", {"jwtRules": [{"issuer": "https://idp"}]}, "shop"),
    ],
    ids=["paths", "methods", "request-principals", "request-header", "root-namespace", "jwt"],
)
def test_when_needed_parses_where_a_policy_reads_requests(doc: Any) -> None:
    snap, me = build(doc)
    assert _parses(snap, me)


def annotated(me: Workload, value: str) -> Workload:
    return replace(me, annotations={DESTINATION_L7_ANNOTATION: value})


def test_the_workloads_annotation_decides_over_the_agents_mode() -> None:
    snap, me = build()
    assert not _parses(snap, annotated(me, "when-needed"), mode="always")
    assert _parses(snap, annotated(me, "always"), mode="when-needed")
    # What when-needed still parses, it parses under the annotation too.
    assert _parses(snap, annotated(me, "when-needed"), mode="always", reported=False)
    jwt = config("RequestAuthentication", "jwt", {"jwtRules": [{"issuer": "https://idp"}]}, "shop")
    snap, me = build(jwt)
    assert _parses(snap, annotated(me, "when-needed"), mode="always")


@pytest.mark.parametrize("value", ["sometimes", "ALWAYS", "", "when_needed"])
def test_a_value_the_mesh_does_not_know_is_an_error_and_parses_everything(value: str) -> None:
    with pytest.raises(ValueError, match=f"{DESTINATION_L7_ANNOTATION}={value!r}: expected"):
        destination_l7_annotation({DESTINATION_L7_ANNOTATION: value})
    # Refused at enrollment; a Workload that reached the store anyway is parsed (loses nothing).
    assert destination_l7_of({DESTINATION_L7_ANNOTATION: value}, "when-needed") == "always"
    snap, me = build()
    assert _parses(snap, annotated(me, value), mode="when-needed")


def test_no_annotation_is_the_agents_mode() -> None:
    assert destination_l7_annotation({"other": "x"}) is None
    assert destination_l7_annotation({DESTINATION_L7_ANNOTATION: " when-needed "}) == "when-needed"
    assert destination_l7_of({}, "when-needed") == "when-needed"
    assert destination_l7_of({}, "always") == "always"


def test_a_policy_selecting_another_workload_does_not_count() -> None:
    other = ap("paths", "shop", "ALLOW", [{"to": [{"operation": {"paths": ["/x"]}}]}],
               selector={"app": "db"})  # fmt: skip
    snap, me = build(other)
    assert not _parses(snap, me)


def test_a_relayed_http_stream_is_closed_once_a_policy_reads_requests() -> None:
    registry = LiveConnections()
    relayed, relayed_closer = live(1, replace(tunnel_peer(), deferred_http=True))
    plain_l4, l4_closer = live(2, tunnel_peer())
    for c in (relayed, plain_l4):
        registry.add(c)
    # An L4-only policy allowing the client: both stay.
    snap, me = build(ap("mesh", "shop", "ALLOW", [{"from": [{"source": {"principals": ["*"]}}]}]))
    assert registry.sweep(snap, me) == []
    # A RequestAuthentication (no denial at all): the relayed stream closes, so the source's
    # next stream is parsed and its tokens checked; the plain L4 stream is untouched.
    jwt = config("RequestAuthentication", "jwt", {"jwtRules": [{"issuer": "https://idp"}]}, "shop")
    snap, me = build(jwt)
    assert [c.conn.cid for c in registry.sweep(snap, me)] == [1]
    assert "reads this HTTP port's requests" in relayed_closer.calls[0].reason
    assert l4_closer.calls == []


def test_a_relayed_http_stream_is_closed_once_its_workload_asks_for_always() -> None:
    registry = LiveConnections()
    relayed, closer = live(1, replace(tunnel_peer(), deferred_http=True))
    registry.add(relayed)
    snap, me = build()
    assert registry.sweep(snap, annotated(me, "when-needed")) == []
    assert [c.conn.cid for c in registry.sweep(snap, annotated(me, "always"))] == [1]
    assert f"{DESTINATION_L7_ANNOTATION} is now 'always'" in closer.calls[0].reason
