"""Rewriting the VirtualService and DestinationRule for a route change (pure)."""

from __future__ import annotations

import pytest
from rollout_docs import AB, CANARY, MESH, documents, rollout_yaml

from nodeagent.rollout.model import compile_rollout
from nodeagent.rollout.routes import RouteError, change, check


def setup(analysis: str = CANARY, extra: str = "") -> tuple:  # type: ignore[type-arg]
    docs = documents(MESH + "---\n" + rollout_yaml(analysis, extra))
    by_kind = {d.kind: d.body for d in docs}
    return (
        compile_rollout(by_kind["Rollout"]),
        by_kind["VirtualService"],
        by_kind["DestinationRule"],
    )


def test_a_weight_splits_the_route_between_stable_and_canary() -> None:
    r, vs, dr = setup()
    new, new_dr = change(r, "weight", 20, vs, dr)
    assert new_dr is None
    assert new["spec"]["http"][0]["route"] == [
        {"destination": {"host": "my-app", "subset": "v1", "port": {"number": 80}}, "weight": 80},
        {"destination": {"host": "my-app", "subset": "v2", "port": {"number": 80}}, "weight": 20},
    ]
    assert new["spec"]["http"][0]["match"] == [{"uri": {"prefix": "/"}}]
    assert vs["spec"]["http"][0]["route"][0].get("weight") is None  # the input is untouched
    back, _ = change(r, "rollback", 0, new, dr)
    assert back["spec"]["http"][0]["route"] == [
        {"destination": {"host": "my-app", "subset": "v1", "port": {"number": 80}}}
    ]
    promoted, _ = change(r, "promote", 100, new, dr)
    assert [d["destination"]["subset"] for d in promoted["spec"]["http"][0]["route"]] == ["v2"]


def test_ab_inserts_a_match_route_before_the_route_and_removes_it_after() -> None:
    r, vs, dr = setup(AB)
    on, _ = change(r, "ab-on", 0, vs, dr)
    first, second = on["spec"]["http"]
    assert first["name"] == "my-app-ab"
    assert first["match"] == [
        {"uri": {"prefix": "/"}, "headers": {"user-agent": {"regex": ".*Firefox.*"}}}
    ]
    assert [d["destination"]["subset"] for d in first["route"]] == ["v2"]
    assert second["name"] == "main"
    again, _ = change(r, "ab-on", 0, on, dr)  # idempotent: one A/B route
    assert len(again["spec"]["http"]) == 2
    done, _ = change(r, "promote", 100, on, dr)
    assert [h["name"] for h in done["spec"]["http"]] == ["main"]


def test_stable_labels_promotion_moves_the_canarys_labels_to_stable() -> None:
    r, vs, dr = setup(extra="  promotion: stableLabels\n")
    new_vs, new_dr = change(r, "promote", 0, change(r, "weight", 40, vs, dr)[0], dr)
    assert new_dr is not None
    assert new_dr["spec"]["subsets"][0] == {"name": "v1", "labels": {"version": "v2.0.0"}}
    assert [d["destination"]["subset"] for d in new_vs["spec"]["http"][0]["route"]] == ["v1"]


def test_documents_that_cannot_carry_the_rollout_are_named() -> None:
    r, vs, dr = setup(extra="")
    dr["spec"]["subsets"] = dr["spec"]["subsets"][:1]
    with pytest.raises(RouteError, match="DestinationRule default/my-app has no subset v2"):
        check(r, vs, dr)
    r2, vs2, dr2 = setup()
    vs2["spec"]["http"][0]["route"][0]["destination"]["host"] = "other"
    with pytest.raises(RouteError, match="no http route with a destination on my-app"):
        check(r2, vs2, dr2)
