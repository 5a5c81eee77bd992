"""Inbound decisions on real snapshots: PeerAuthentication levels and ports, then authorization."""

from __future__ import annotations

from typing import Any

import pytest
from proxy_docs import config, snapshot, workload

from nodeagent.proxy.inbound import plaintext_decision, tunnel_decision
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
