"""Percentiles, the constant-rate schedule and coordinated-omission-corrected recording."""

from __future__ import annotations

import pytest

from nodeagent.bench.stats import Recorder, Schedule, percentile, summarize


def test_percentile_is_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 101)]  # 1 … 100
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 90) == 90.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile(samples, 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_percentile_refuses_nothing_and_bad_q() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside 0-100"):
        percentile([1.0], 101)


def test_summarize_keys_and_values() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "p99.9": 4.0, "max": 4.0, "mean": 2.5}


def test_schedule_due_and_intended() -> None:
    sched = Schedule(start=10.0, rate=1000.0)
    assert sched.due(9.999) == 0
    assert sched.due(10.0) == 1  # request 0 is due at the start
    assert sched.due(10.0105) == 11
    assert sched.intended(0) == 10.0
    assert sched.intended(500) == pytest.approx(10.5)
    with pytest.raises(ValueError, match="positive"):
        Schedule(0.0, 0.0)


def _simulate(stall_at: float, stall: float, rate: float, seconds: float) -> Recorder:
    """One connection, 0.1 ms service time, one request stalling `stall` s: sends happen at the
    intended time or, if the connection is busy, as soon as it frees up (as in the generator)."""
    sched = Schedule(0.0, rate)
    rec = Recorder()
    free_at = 0.0
    stalled = False
    for i in range(int(rate * seconds)):
        intended = sched.intended(i)
        sent = max(intended, free_at)
        service = 0.0001
        if not stalled and sent >= stall_at:
            service, stalled = stall, True
        free_at = sent + service
        rec.record(intended, sent, free_at)
    return rec


def test_a_stall_costs_every_request_scheduled_during_it() -> None:
    rec = _simulate(stall_at=0.5, stall=0.1, rate=1000.0, seconds=2.0)
    summary = rec.summary()
    # ~100 requests were due during the 100 ms stall: corrected, they all waited (≥ 1% of 2000).
    assert summary["p99"] > 50.0
    # A closed-loop client would have seen one slow request in 2000: invisible at p99.
    assert summary["uncorrected_p99"] < 1.0
    assert summary["max"] == pytest.approx(100.0, abs=0.01)
    assert len(rec) == 2000


def test_recorder_refuses_times_out_of_order() -> None:
    rec = Recorder()
    with pytest.raises(ValueError, match="out of order"):
        rec.record(1.0, 0.5, 2.0)
    assert rec.summary() == {}
    rec.error()
    assert rec.errors == 1
