"""Shared helpers for the balancing tests: a fake clock, endpoints, a picker from a policy doc."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from nodeagent.balance import OutlierEvent, Picker, resolve
from nodeagent.snapshot.model import DestinationRule, Endpoint, Subset, freeze


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def endpoints(n: int, port: int = 8080, base: str = "10.0.0.") -> list[Endpoint]:
    return [Endpoint(f"{base}{i + 1}", port) for i in range(n)]


def rule(traffic_policy: dict[str, Any] | None = None, subsets: Any = None) -> DestinationRule:
    subs = {
        s["name"]: Subset(s["name"], freeze(s.get("labels", {})), freeze(s.get("trafficPolicy")))
        for s in (subsets or [])
    }
    return DestinationRule(
        "default",
        "dr",
        "svc.default.svc.cluster.local",
        freeze(subs),
        freeze(traffic_policy) if traffic_policy is not None else None,
    )


def picker(
    traffic_policy: dict[str, Any] | None,
    eps: list[Endpoint],
    clock: FakeClock,
    seed: int = 1,
    port: int = 80,
    on_event: Callable[[OutlierEvent], None] | None = None,
) -> Picker:
    policy = resolve(rule(traffic_policy) if traffic_policy is not None else None, None, port)
    return Picker("test", policy, eps, now=clock, rng=random.Random(seed), on_event=on_event)
