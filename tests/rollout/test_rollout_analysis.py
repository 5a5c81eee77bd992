"""The rollout algorithm, step by step with a hand-driven clock (pure)."""

from __future__ import annotations

from rollout_docs import AB, CANARY, body, rollout_yaml

from nodeagent.rollout import analysis
from nodeagent.rollout.metrics import Figures
from nodeagent.rollout.model import compile_rollout
from nodeagent.rollout.status import Status

HEALTHY = Figures(200, 0, {5.0: 200, float("inf"): 200})
ERRORS = Figures(200, 20, {5.0: 200, float("inf"): 200})
SLOW = Figures(200, 0, {250.0: 0, 500.0: 200, float("inf"): 200})


def run(analysis_text: str, canary: Figures | None, limit: int = 20) -> list[Status]:
    r = compile_rollout(body(rollout_yaml(analysis_text)))
    now = 1000.0
    s = analysis.start(r, observed=7, now=now)
    s = analysis.begin(r, s, now).status
    seen = [s]
    for _ in range(limit):
        now += r.interval
        assert analysis.due(r, s, now)
        assert not analysis.due(r, s, now - 0.01)
        s = analysis.step(r, s, analysis.evaluate(r, canary), now).status
        seen.append(s)
        if s.phase != "Progressing":
            break
    return seen


def test_a_healthy_canary_walks_the_weights_then_promotes() -> None:
    seen = run(CANARY, HEALTHY)
    assert [s.weight for s in seen] == [20, 40, 60, 60]
    assert seen[-1].phase == "Promoting"
    assert seen[-1].failed_checks == 0
    assert seen[-1].last_analysis == {
        "requests": 200,
        "request-success-rate": 100.0,
        "request-duration": 0.5 * 5 * 2 * 0.99,
    }
    r = compile_rollout(body(rollout_yaml(CANARY)))
    done = analysis.promote(r, seen[-1], 2000.0)
    assert (done.status.phase, done.status.weight, done.route) == ("Succeeded", 100, "promote")


def test_errors_roll_back_after_threshold_checks() -> None:
    seen = run(CANARY, ERRORS)
    assert [s.phase for s in seen] == ["Progressing", "Progressing", "Failed"]
    assert seen[-1].weight == 0
    assert seen[-1].failed_checks == 2
    assert "success rate 90.00% < 99%" in seen[-1].reason
    assert seen[-1].history[-1]["time"] - seen[0].history[-1]["time"] == 4.0


def test_a_slow_canary_fails_on_p99() -> None:
    seen = run(CANARY, SLOW)
    assert seen[-1].phase == "Failed"
    assert "p99 498ms > 200ms" in seen[-1].reason


def test_no_data_is_a_failed_check_unless_min_requests_says_not_yet() -> None:
    assert run(CANARY, None)[-1].phase == "Failed"
    r = compile_rollout(body(rollout_yaml(CANARY + "    minRequests: 50\n")))
    check = analysis.evaluate(r, Figures(10, 0, {5.0: 10, float("inf"): 10}))
    assert check.passed is None
    assert "10 of 50 requests" in check.reason
    s = analysis.begin(r, analysis.start(r, 1, 0.0), 0.0).status
    same = analysis.step(r, s, check, 2.0).status
    assert (same.weight, same.failed_checks, same.step_started) == (20, 0, 0.0)


def test_ab_iterations_then_promotion() -> None:
    seen = run(AB, HEALTHY)
    assert [s.iteration for s in seen] == [0, 1, 2, 3]
    assert seen[-1].phase == "Promoting"
    assert seen[-1].weight == 0


def test_a_failed_gate_is_a_failed_check() -> None:
    r = compile_rollout(body(rollout_yaml(CANARY)))
    check = analysis.evaluate(r, HEALTHY, "webhook load-test: HTTP 500")
    assert check.passed is False
    assert check.reason == "webhook load-test: HTTP 500"


def test_pause_and_resume_restart_the_interval() -> None:
    r = compile_rollout(body(rollout_yaml(CANARY)))
    s = analysis.begin(r, analysis.start(r, 1, 0.0), 0.0).status
    paused = analysis.pause(s, 1.0)
    assert paused.phase == "Paused"
    assert not analysis.due(r, paused, 100.0)
    resumed = analysis.resume(paused, 50.0)
    assert resumed.phase == "Progressing"
    assert resumed.step_started == 50.0
    assert [e["message"] for e in resumed.events][-2:] == ["paused", "resumed"]
