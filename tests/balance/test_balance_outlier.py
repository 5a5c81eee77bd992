"""Outlier detection and panic mode, driven by a fake clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from helpers_balance import FakeClock, endpoints, picker
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from nodeagent.balance import EndpointState, NoHealthyUpstream, Outcome, OutlierEvent, Picker
from nodeagent.balance.registry import log_event


def _od(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "consecutive5xxErrors": 3,
        "interval": "1s",
        "baseEjectionTime": "10s",
        "maxEjectionPercent": 100,
    }
    base.update(fields)
    return {"loadBalancer": {"simple": "ROUND_ROBIN"}, "outlierDetection": base}


def _fail(s: EndpointState, n: int, outcome: Outcome = Outcome.ERROR_5XX) -> None:
    for _ in range(n):
        s.start()
        s.finish(0.01, outcome)


def _picked(p: Picker, n: int = 300) -> Counter[str]:
    return Counter(p.pick().address for _ in range(n))


def test_ejection_after_n_consecutive_errors_and_readmission() -> None:
    clock = FakeClock()
    events: list[OutlierEvent] = []
    p = picker(_od(), endpoints(3), clock, on_event=events.append)
    bad = p.states[0]
    _fail(bad, 2)
    bad.start()
    bad.finish(0.01)  # a success resets the count
    _fail(bad, 2)
    assert not bad.ejected
    _fail(bad, 1)
    assert bad.ejected
    assert [(e.kind, e.endpoint, e.reason) for e in events] == [
        ("ejected", "10.0.0.1:8080", "consecutive_5xx")
    ]
    assert events[0].until == pytest.approx(clock.t + 10.0)
    # No picks while ejected, up to the end of its ejection time.
    for _ in range(9):
        clock.advance(1.0)
        assert _picked(p, 30)[bad.address] == 0
    clock.advance(1.0)
    assert _picked(p, 30)[bad.address] == 10  # readmitted at the sweep, round robin again
    assert not bad.ejected
    assert [e.kind for e in events] == ["ejected", "readmitted"]


def test_still_failing_is_ejected_again_for_longer() -> None:
    clock = FakeClock()
    p = picker(_od(), endpoints(3), clock)
    bad = p.states[1]
    durations = []
    for _ in range(3):
        _fail(bad, 3)
        assert bad.ejected
        start = clock.t
        while bad.ejected:
            clock.advance(1.0)
            p.maintain()
        durations.append(clock.t - start)
    assert durations == [10.0, 20.0, 30.0]
    # Healthy for long enough: the multiplier comes down again, one step per ejection length.
    for _ in range(100):
        clock.advance(1.0)
        p.maintain()
    assert bad.eject_backoff == 0
    _fail(bad, 3)
    start = clock.t
    while bad.ejected:
        clock.advance(1.0)
        p.maintain()
    assert clock.t - start == 10.0


def test_gateway_errors_and_connect_failures() -> None:
    clock = FakeClock()
    p = picker(_od(consecutive5xxErrors=0, consecutiveGatewayErrors=2), endpoints(4), clock)
    a, b, c = p.states[0], p.states[1], p.states[2]
    _fail(a, 5, Outcome.ERROR_5XX)  # 500s are not gateway errors, and 5xx detection is off
    assert not a.ejected
    _fail(b, 1, Outcome.GATEWAY_ERROR)
    _fail(b, 1, Outcome.ERROR_5XX)  # a 500 breaks the gateway streak
    _fail(b, 1, Outcome.GATEWAY_ERROR)
    assert not b.ejected
    _fail(b, 1, Outcome.TIMEOUT)
    assert b.ejected
    _fail(c, 2, Outcome.CONNECT_FAILURE)  # L4: a failed connect counts as a 503
    assert c.ejected
    cancelled = p.states[3]
    _fail(cancelled, 10, Outcome.CANCELLED)
    assert not cancelled.ejected


def test_max_ejection_percent_and_at_least_one() -> None:
    clock = FakeClock()
    events: list[OutlierEvent] = []
    p = picker(_od(maxEjectionPercent=50), endpoints(4), clock, on_event=events.append)
    for s in p.states:
        _fail(s, 3)
    assert sum(s.ejected for s in p.states) == 2
    assert [e.kind for e in events].count("ejection_overflow") == 2
    # 10% of 3 is less than one endpoint: one may still be ejected (Envoy), not two.
    q = picker(_od(maxEjectionPercent=10), endpoints(3), clock)
    for s in q.states:
        _fail(s, 3)
    assert sum(s.ejected for s in q.states) == 1
    z = picker(_od(maxEjectionPercent=0), endpoints(3), clock)
    _fail(z.states[0], 3)
    assert not z.states[0].ejected


def test_panic_threshold_spreads_over_all() -> None:
    clock = FakeClock()
    p = picker(_od(), endpoints(4), clock)
    _fail(p.states[0], 3)
    assert not p.panic
    assert _picked(p, 300)["10.0.0.1"] == 0
    _fail(p.states[1], 3)  # 2 of 4 healthy = 50%: not below the threshold
    assert not p.panic
    _fail(p.states[2], 3)  # 25% < 50%: panic, every endpoint is picked
    assert p.panic
    assert set(_picked(p, 40)) == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"}


def test_min_health_percent_zero_disables_panic() -> None:
    clock = FakeClock()
    p = picker(_od(minHealthPercent=0, consecutive5xxErrors=1), endpoints(2), clock)
    for s in p.states:
        _fail(s, 1)
    assert not p.panic
    with pytest.raises(NoHealthyUpstream, match="all 2 endpoints ejected"):
        p.pick()
    clock.advance(10.0)
    assert p.pick().address in {"10.0.0.1", "10.0.0.2"}


def test_without_outlier_detection_nothing_is_ejected() -> None:
    p = picker({"loadBalancer": {"simple": "ROUND_ROBIN"}}, endpoints(2), FakeClock())
    _fail(p.states[0], 100, Outcome.GATEWAY_ERROR)
    assert not p.states[0].ejected
    assert p.states[0].failures == 100


@given(
    script=st.lists(
        st.tuples(
            st.integers(0, 4),
            st.sampled_from(list(Outcome)),
            st.floats(0, 5),
        ),
        max_size=200,
    ),
    max_pct=st.integers(0, 100),
)
@settings(max_examples=60, deadline=None)
def test_invariants_over_random_histories(
    script: list[tuple[int, Outcome, float]], max_pct: int
) -> None:
    clock = FakeClock()
    p = picker(_od(consecutiveGatewayErrors=2, maxEjectionPercent=max_pct), endpoints(5), clock)
    for idx, outcome, dt in script:
        clock.advance(dt)
        s = p.states[idx]
        s.start()
        s.finish(0.01, outcome)
        ejected = [x for x in p.states if x.ejected]
        assert p.outlier is not None
        assert p.outlier.ejected_count == len(ejected)
        if max_pct == 0:
            assert not ejected
        else:
            assert len(ejected) <= max(1, max_pct * 5 // 100)
        if not p.panic:
            picked = p.pick()
            assert not picked.ejected
        for x in ejected:  # never longer than the capped ejection time plus one interval
            assert clock.t - x.ejected_at <= 300.0 + 1.0


def test_status_mapping() -> None:
    assert [Outcome.from_status(c) for c in (200, 404, 500, 501, 502, 503, 504)] == [
        Outcome.SUCCESS,
        Outcome.SUCCESS,
        Outcome.ERROR_5XX,
        Outcome.ERROR_5XX,
        Outcome.GATEWAY_ERROR,
        Outcome.GATEWAY_ERROR,
        Outcome.GATEWAY_ERROR,
    ]


def test_events_are_logged_one_line_each() -> None:
    clock = FakeClock()
    p = picker(_od(consecutive5xxErrors=1), endpoints(2), clock, on_event=log_event)
    with capture_logs() as logs:
        _fail(p.states[0], 1)
        clock.advance(10.0)
        p.maintain()
    assert [(x["event"], x["endpoint"]) for x in logs] == [
        ("outlier.ejected", "10.0.0.1:8080"),
        ("outlier.readmitted", "10.0.0.1:8080"),
    ]
    assert logs[0]["reason"] == "consecutive_5xx"
    assert logs[0]["until"] == pytest.approx(1010.0)
