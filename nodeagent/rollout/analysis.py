"""The rollout algorithm as pure functions: given the spec, the status and what was measured,
what the rollout does next (docs/rollouts.md, "The algorithm").

`start` begins a run (Initializing); `begin` moves it to its first step once the pre-rollout
gates passed; `evaluate` checks one interval's figures of the canary subset against the
metrics; `step` turns a check into the next status and the route change to make with it in the
same transaction. Time is a parameter (`now`, unix seconds): the tests drive it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from nodeagent.rollout.metrics import Figures
from nodeagent.rollout.model import Rollout
from nodeagent.rollout.status import Status

RouteChange = Literal["none", "weight", "ab-on", "promote", "rollback"]
SUCCESS_RATE = "request-success-rate"
DURATION = "request-duration"
REQUESTS = "requests"


@dataclass(frozen=True, slots=True)
class Check:
    """One interval's verdict. `passed` None: not enough data yet (minRequests), no verdict."""

    passed: bool | None
    values: dict[str, float | None]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Move:
    status: Status
    route: RouteChange = "none"


def start(rollout: Rollout, observed: int, now: float) -> Status:
    status = Status(
        namespace=rollout.namespace,
        name=rollout.name,
        phase="Initializing",
        host=rollout.host,
        stable=rollout.stable,
        canary=rollout.canary,
        observed=observed,
        updated=now,
    )
    what = (
        f"A/B experiment: {rollout.iterations} iteration(s) of {rollout.interval:g}s"
        if rollout.is_ab
        else "canary: weights " + ", ".join(f"{w}%" for w in rollout.steps)
    )
    return status.with_event(now, f"new rollout of {rollout.canary}, {what}")


def begin(rollout: Rollout, status: Status, now: float) -> Move:
    """Initializing → Progressing at the first step (its weight, or the A/B match route)."""
    if rollout.is_ab:
        moved = replace(status, phase="Progressing", weight=0, iteration=0)
        moved = moved.with_event(
            now, f"A/B: requests matching {_match_text(rollout)} go to {rollout.canary}"
        )
        return Move(moved.with_step(now, {}), "ab-on")
    weight = rollout.steps[0]
    moved = replace(status, phase="Progressing", weight=weight, iteration=0)
    moved = moved.with_event(now, f"advance {rollout.canary} weight to {weight}%")
    return Move(moved.with_step(now, {}), "weight")


def _match_text(rollout: Rollout) -> str:
    parts = []
    for m in rollout.match:
        for header, cond in sorted((m.get("headers") or {}).items()):
            for op, value in cond.items():
                parts.append(f"{header} {op} {value!r}")
        for param, cond in sorted((m.get("queryParams") or {}).items()):
            for op, value in cond.items():
                parts.append(f"?{param} {op} {value!r}")
        for op, value in (m.get("uri") or {}).items():
            parts.append(f"uri {op} {value!r}")
    return " or ".join(parts) or "the match"


def due(rollout: Rollout, status: Status, now: float) -> bool:
    """Whether the current step's interval has passed (the analysis is due)."""
    return status.phase == "Progressing" and now >= status.step_started + rollout.interval


def evaluate(rollout: Rollout, canary: Figures | None, gates_failed: str = "") -> Check:
    """Check the canary's figures of one interval against the rollout's metrics."""
    fig = canary or Figures()
    values: dict[str, float | None] = {REQUESTS: fig.requests}
    for metric in rollout.metrics:
        if metric.name == SUCCESS_RATE:
            values[SUCCESS_RATE] = fig.success_rate
        else:
            values[DURATION] = fig.quantile(0.99)
    if gates_failed:
        return Check(False, values, gates_failed)
    if fig.requests < max(1, rollout.min_requests):
        if rollout.min_requests:
            return Check(
                None, values, f"{fig.requests:.0f} of {rollout.min_requests} requests: not yet"
            )
        return Check(False, values, f"no requests to {rollout.canary} in the interval")
    failures = []
    for metric in rollout.metrics:
        value = values[SUCCESS_RATE if metric.name == SUCCESS_RATE else DURATION]
        if value is None:
            failures.append(f"{metric.name}: no data")
        elif not metric.passes(value):
            if metric.name == SUCCESS_RATE:
                failures.append(f"success rate {value:.2f}% < {metric.minimum:g}%")
            else:
                failures.append(f"p99 {value:.0f}ms > {metric.maximum:g}ms")
    return Check(not failures, values, "; ".join(failures))


def step(rollout: Rollout, status: Status, check: Check, now: float) -> Move:
    """The status after an interval's check, and the route change that goes with it."""
    if check.passed is None:
        return Move(status.with_event(now, check.reason))  # the same step continues
    analysed = replace(status, last_analysis=check.values)
    if not check.passed:
        failed = analysed.failed_checks + 1
        analysed = replace(analysed, failed_checks=failed)
        if failed >= rollout.threshold:
            rolled = replace(analysed, phase="Failed", weight=0)
            rolled = rolled.with_step(now, check.values)
            message = (
                f"rolled back to {rollout.stable}: {failed} failed check(s) "
                f"(threshold {rollout.threshold}), last: {check.reason}"
            )
            return Move(rolled.with_event(now, message), "rollback")
        analysed = analysed.with_event(
            now, f"check failed ({failed}/{rollout.threshold}): {check.reason}"
        )
        # the failed interval counts as a step: the next check measures a fresh interval
        return Move(analysed.with_step(now, check.values))
    iteration = analysed.iteration + 1
    analysed = replace(analysed, iteration=iteration)
    if rollout.is_ab:
        if iteration >= rollout.iterations:
            return _promoting(rollout, analysed, now, check)
        moved = analysed.with_event(now, f"A/B iteration {iteration}/{rollout.iterations} passed")
        return Move(moved.with_step(now, check.values))
    later = [w for w in rollout.steps if w > analysed.weight]
    if not later:
        return _promoting(rollout, analysed, now, check)
    moved = replace(analysed, weight=later[0])
    moved = moved.with_event(now, f"advance {rollout.canary} weight to {later[0]}%")
    return Move(moved.with_step(now, check.values), "weight")


def _promoting(rollout: Rollout, status: Status, now: float, check: Check) -> Move:
    moved = replace(status, phase="Promoting").with_step(now, check.values)
    return Move(moved.with_event(now, f"analysis passed: promoting {rollout.canary}"))


def promote(rollout: Rollout, status: Status, now: float, why: str = "") -> Move:
    """Promoting → Succeeded: every request to the canary (or the stable subset's new labels)."""
    how = (
        f"{rollout.stable} now has {rollout.canary}'s labels"
        if rollout.promotion == "stableLabels"
        else f"all traffic to {rollout.canary}"
    )
    weight = 0 if rollout.promotion == "stableLabels" else 100
    done = replace(status, phase="Succeeded", weight=weight, resume_phase="")
    return Move(done.with_event(now, f"promoted{why}: {how}"), "promote")


def abort(rollout: Rollout, status: Status, now: float, why: str) -> Move:
    """Any phase → Failed: every request to the stable subset."""
    done = replace(status, phase="Failed", weight=0, resume_phase="")
    return Move(done.with_event(now, f"rolled back to {rollout.stable}: {why}"), "rollback")


def pause(status: Status, now: float) -> Status:
    paused = replace(status, phase="Paused", resume_phase=status.phase)
    return paused.with_event(now, "paused")


def resume(status: Status, now: float) -> Status:
    """Paused → the phase it had; the interrupted step's interval starts again now."""
    phase = (
        status.resume_phase
        if status.resume_phase in ("Initializing", "Progressing")
        else ("Progressing")
    )
    resumed = replace(status, phase=phase, resume_phase="")  # type: ignore[arg-type]
    resumed = resumed.with_event(now, "resumed")
    return resumed.with_step(now, dict(status.last_analysis)) if resumed.history else resumed
