"""Outlier detection: Envoy's consecutive-error ejection state machine, as Istio configures it.

Per endpoint: `healthy` ──(N consecutive 5xx / gateway errors)──▶ `ejected` ──(at a sweep, once
base x backoff has passed)──▶ `healthy` (counters reset; still failing ⇒ ejected again, for
longer). Ejection is immediate on the Nth error; readmission happens at the interval sweeps.

- Ejection time = baseEjectionTime x backoff, capped at max(base, 300 s). Backoff grows by one
  per ejection and shrinks by one at a sweep once the endpoint has stayed healthy for as long as
  its last ejection lasted (Envoy's `ejectTimeBackoff`).
- maxEjectionPercent bounds how many endpoints may be ejected at once, but one endpoint can
  always be ejected when it is above 0 (Envoy: "will eject at least one host regardless").
- minHealthPercent is the picker's panic threshold, not handled here.
- With `streaks` (`--workers N`: the workers' shared table, `shared.ClusterStreaks`) the
  thresholds compare the node's consecutive errors, every worker's results in one run; the
  endpoint's own counters stay this worker's (and the fallback when the table has no slot).
Pure but for `streaks`: time is a float argument, the caller owns the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nodeagent.balance.policy import OutlierDetection
from nodeagent.balance.shared import ClusterStreaks
from nodeagent.balance.state import GATEWAY_LIKE, EndpointState, Outcome

Reason = Literal["consecutive_5xx", "consecutive_gateway_errors", "ejection_time_elapsed"]


@dataclass(frozen=True, slots=True)
class OutlierEvent:
    """An ejection or readmission, for logs and metrics."""

    cluster: str
    kind: Literal["ejected", "readmitted", "ejection_overflow"]
    endpoint: str  # address:port
    reason: Reason
    at: float
    ejections: int  # times this endpoint was ejected so far
    until: float | None = None  # ejected: the earliest readmission time
    backoff: int = 0  # ejected: the backoff multiplier its ejection time came from


class OutlierDetector:
    def __init__(
        self,
        cluster: str,
        policy: OutlierDetection,
        now: float,
        *,
        streaks: ClusterStreaks | None = None,
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.streaks = streaks
        self.next_sweep = now + policy.interval_s
        self.ejected_count = 0

    def ejection_time(self, s: EndpointState) -> float:
        p = self.policy
        return min(p.base_ejection_s * s.eject_backoff, max(p.base_ejection_s, p.max_ejection_s))

    def record(
        self, s: EndpointState, outcome: Outcome, now: float, total: int
    ) -> OutlierEvent | None:
        """Count one result; the event when it ejects (or would, but for maxEjectionPercent)."""
        if s.ejected or outcome is Outcome.CANCELLED:
            return None
        if outcome is Outcome.SUCCESS:
            s.consecutive_5xx = 0
            s.consecutive_gateway = 0
            if self.streaks is not None:
                self.streaks.reset(s.key)
            return None
        p = self.policy
        gateway = outcome in GATEWAY_LIKE
        if gateway:
            s.consecutive_gateway += 1
        else:
            s.consecutive_gateway = 0
        s.consecutive_5xx += 1
        c5, cg = s.consecutive_5xx, s.consecutive_gateway
        if self.streaks is not None:
            node = self.streaks.error(s.key, gateway=gateway, now=now)
            if node is not None:
                c5, cg = node
        if p.consecutive_gateway > 0 and cg >= p.consecutive_gateway:
            return self._eject(s, now, total, "consecutive_gateway_errors")
        if p.consecutive_5xx > 0 and c5 >= p.consecutive_5xx:
            return self._eject(s, now, total, "consecutive_5xx")
        return None

    def _eject(self, s: EndpointState, now: float, total: int, reason: Reason) -> OutlierEvent:
        # Envoy resets the counter that fired whether or not the ejection is allowed.
        s.consecutive_5xx = 0
        s.consecutive_gateway = 0
        if self.streaks is not None:
            self.streaks.reset(s.key)
        if not self.may_eject(total):
            return OutlierEvent(self.cluster, "ejection_overflow", s.key, reason, now, s.ejections)
        p = self.policy
        if p.base_ejection_s * s.eject_backoff < p.max_ejection_s + p.base_ejection_s:
            s.eject_backoff += 1
        self._mark(s, now)
        until = now + self.ejection_time(s)
        return OutlierEvent(
            self.cluster, "ejected", s.key, reason, now, s.ejections, until, s.eject_backoff
        )

    def may_eject(self, total: int) -> bool:
        """maxEjectionPercent allows one more ejection (always one, when above 0)."""
        pct = self.policy.max_ejection_percent
        return 100.0 * (self.ejected_count + 1) <= pct * total or (
            self.ejected_count == 0 and pct > 0
        )

    def adopt(self, s: EndpointState, backoff: int, now: float, total: int) -> bool:
        """Another worker process ejected `s` with `backoff`: eject it here too, for the same
        ejection time (readmitted by this detector's sweeps). False when `s` is already
        ejected here or maxEjectionPercent forbids it."""
        if s.ejected or not self.may_eject(total):
            return False
        s.eject_backoff = max(s.eject_backoff, backoff)
        s.consecutive_5xx = 0
        s.consecutive_gateway = 0
        self._mark(s, now)
        return True

    def _mark(self, s: EndpointState, now: float) -> None:
        s.ejected = True
        s.ejected_at = now
        s.ejections += 1
        self.ejected_count += 1

    def sweep(self, states: Sequence[EndpointState], now: float) -> list[OutlierEvent]:
        """The interval timer: readmit endpoints whose time is up, relax backoffs."""
        interval = self.policy.interval_s
        if now >= self.next_sweep:
            # A lazy sweep may cover several intervals: keep the timer on its grid.
            self.next_sweep += interval * (1 + int((now - self.next_sweep) // interval))
        events: list[OutlierEvent] = []
        base = self.policy.base_ejection_s
        for s in states:
            if not s.ejected:
                if (
                    s.eject_backoff > 0
                    and s.unejected_at is not None
                    and s.unejected_at + base * s.eject_backoff <= now
                ):
                    s.eject_backoff -= 1
                continue
            if s.ejected_at + self.ejection_time(s) <= now:
                s.ejected = False
                s.unejected_at = now
                s.consecutive_5xx = 0
                s.consecutive_gateway = 0
                self.ejected_count -= 1
                events.append(
                    OutlierEvent(
                        self.cluster,
                        "readmitted",
                        s.key,
                        "ejection_time_elapsed",
                        now,
                        s.ejections,
                    )
                )
        return events
