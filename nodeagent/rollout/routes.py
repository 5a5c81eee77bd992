"""Rewriting a rollout's VirtualService (and DestinationRule) for a route change (pure).

The rollout's route is the VirtualService's http route named `virtualService.route`, or else
the first one with a destination on the rollout's host. A weight w makes its destinations
[stable 100-w, canary w] (one destination without a weight at 0 or 100); the destination
fields (port) are kept from the route as it was. An A/B experiment inserts, just before that
route, a copy of it named `<rollout>-ab` whose matches are the route's own matches combined with
the experiment's (header maps merged) and whose only destination is the canary; the copy goes
again on promotion or rollback. Every result is checked with the VirtualService validator.
"""

from __future__ import annotations

import copy
from typing import Any

from nodeagent.config.kinds import KINDS
from nodeagent.config.schema import Walker
from nodeagent.config.validate.common import fqdn
from nodeagent.rollout.analysis import RouteChange
from nodeagent.rollout.model import Rollout


class RouteError(ValueError):
    """The VirtualService or DestinationRule cannot carry the rollout as configured."""


def ab_route_name(rollout: Rollout) -> str:
    return f"{rollout.name}-ab"


def _is_host(rollout: Rollout, host: str, namespace: str) -> bool:
    return fqdn(host, namespace) == rollout.fqdn


def find_route(rollout: Rollout, vs: dict[str, Any]) -> int:
    """The index of the rollout's http route in the VirtualService body."""
    routes = vs["spec"].get("http") or []
    namespace = vs["metadata"]["namespace"]
    ab = ab_route_name(rollout)
    for i, route in enumerate(routes):
        if route.get("name") == ab:
            continue
        if rollout.route is not None:
            if route.get("name") == rollout.route:
                return i
            continue
        if any(
            _is_host(rollout, d["destination"]["host"], namespace) for d in route.get("route") or []
        ):
            return i
    where = f'named "{rollout.route}"' if rollout.route else f"with a destination on {rollout.host}"
    raise RouteError(
        f"VirtualService {namespace}/{vs['metadata']['name']} has no http route {where}"
    )


def _destination(rollout: Rollout, route: dict[str, Any], subset: str) -> dict[str, Any]:
    template: dict[str, Any] = {"host": rollout.host}
    for d in route.get("route") or []:
        if _is_host(rollout, d["destination"]["host"], rollout.namespace):
            template = copy.deepcopy(d["destination"])
            break
    template["subset"] = subset
    return template


def with_weight(rollout: Rollout, vs: dict[str, Any], weight: int) -> dict[str, Any]:
    out = copy.deepcopy(vs)
    route = out["spec"]["http"][find_route(rollout, out)]
    stable = _destination(rollout, route, rollout.stable)
    canary = _destination(rollout, route, rollout.canary)
    if weight <= 0:
        route["route"] = [{"destination": stable}]
    elif weight >= 100:
        route["route"] = [{"destination": canary}]
    else:
        route["route"] = [
            {"destination": stable, "weight": 100 - weight},
            {"destination": canary, "weight": weight},
        ]
    return out


def _merge(route_match: dict[str, Any], ab: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(route_match)
    for key, value in ab.items():
        if key in ("headers", "queryParams"):
            merged[key] = {**(merged.get(key) or {}), **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def without_ab(rollout: Rollout, vs: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(vs)
    name = ab_route_name(rollout)
    out["spec"]["http"] = [r for r in out["spec"].get("http") or [] if r.get("name") != name]
    return out


def with_ab(rollout: Rollout, vs: dict[str, Any]) -> dict[str, Any]:
    out = without_ab(rollout, vs)
    index = find_route(rollout, out)
    route = out["spec"]["http"][index]
    ab = {k: copy.deepcopy(v) for k, v in route.items() if k not in ("name", "match", "route")}
    ab["name"] = ab_route_name(rollout)
    own = route.get("match") or [{}]
    ab["match"] = [_merge(m, extra) for m in own for extra in rollout.match]
    ab["route"] = [{"destination": _destination(rollout, route, rollout.canary)}]
    out["spec"]["http"].insert(index, ab)
    return with_weight(rollout, out, 0)


def _subset(dr: dict[str, Any], name: str) -> dict[str, Any]:
    for s in dr["spec"].get("subsets") or []:
        if s["name"] == name:
            return s  # type: ignore[no-any-return]
    meta = dr["metadata"]
    raise RouteError(f"DestinationRule {meta['namespace']}/{meta['name']} has no subset {name}")


def subset_labels(dr: dict[str, Any], name: str) -> dict[str, str]:
    return dict(_subset(dr, name).get("labels") or {})


def check(rollout: Rollout, vs: dict[str, Any], dr: dict[str, Any]) -> None:
    """Raise RouteError when the documents cannot carry this rollout at all."""
    find_route(rollout, vs)
    _subset(dr, rollout.stable)
    _subset(dr, rollout.canary)
    if fqdn(dr["spec"]["host"], dr["metadata"]["namespace"]) != rollout.fqdn:
        raise RouteError(
            f"DestinationRule {dr['metadata']['name']} is for host {dr['spec']['host']}, "
            f"not {rollout.host}"
        )


def change(
    rollout: Rollout, change: RouteChange, weight: int, vs: dict[str, Any], dr: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The VirtualService after `change` (and the DestinationRule, when it changes too)."""
    new_dr: dict[str, Any] | None = None
    if change == "weight":
        new_vs = with_weight(rollout, vs, weight)
    elif change == "ab-on":
        new_vs = with_ab(rollout, vs)
    elif change == "rollback":
        new_vs = with_weight(rollout, without_ab(rollout, vs), 0)
    elif change == "promote":
        if rollout.promotion == "stableLabels":
            new_dr = copy.deepcopy(dr)
            _subset(new_dr, rollout.stable)["labels"] = subset_labels(dr, rollout.canary)
            new_vs = with_weight(rollout, without_ab(rollout, vs), 0)
        else:
            new_vs = with_weight(rollout, without_ab(rollout, vs), 100)
    else:
        return vs, None
    _valid("VirtualService", new_vs)
    if new_dr is not None:
        _valid("DestinationRule", new_dr)
    return new_vs, new_dr


def _valid(kind: str, body: dict[str, Any]) -> None:
    w = Walker()
    KINDS[kind].spec(w, "spec", body["spec"])
    if w.errors:
        raise RouteError(f"the rewritten {kind} would be invalid: " + "; ".join(map(str, w.errors)))
