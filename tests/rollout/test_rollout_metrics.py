"""Windows over counter readings and PromQL-style quantiles (pure)."""

from __future__ import annotations

import math

import pytest
from rollout_docs import HOST, Traffic

from nodeagent.rollout.metrics import Figures, increase, select, window


def counters(t: Traffic, instance: str = "n1") -> dict:  # type: ignore[type-arg]
    ((name, samples),) = t.reading(instance)
    return select(name, samples, HOST)


def test_a_window_counts_what_happened_between_two_readings() -> None:
    t = Traffic()
    t.serve("v1.0.0", 100)
    before = counters(t)
    t.serve("v1.0.0", 80)
    t.serve("v2.0.0", 18)
    t.serve("v2.0.0", 2, code="503")
    figs = window(before, counters(t))
    assert figs["v1.0.0"].requests == 80
    assert figs["v2.0.0"].requests == 20
    assert figs["v2.0.0"].success_rate == pytest.approx(90.0)


def test_a_restarted_agent_counts_from_zero() -> None:
    assert increase(500, 20) == 20
    assert increase(None, 7) == 7
    assert increase(5, 9) == 4


def test_an_instance_not_read_before_contributes_nothing() -> None:
    t = Traffic()
    t.serve("v2.0.0", 10)
    assert window({}, counters(t)) == {}


def test_quantiles_interpolate_in_buckets_like_histogram_quantile() -> None:
    # 100 observations: 90 in (0, 5], 10 in (250, 500]
    fig = Figures(buckets={5.0: 90, 250.0: 90, 500.0: 100, math.inf: 100})
    assert fig.quantile(0.5) == pytest.approx(5 * 50 / 90)
    assert fig.quantile(0.99) == pytest.approx(250 + 250 * 9 / 10)
    assert Figures().quantile(0.99) is None
    assert Figures(buckets={10.0: 0, math.inf: 5}).quantile(0.5) == 10.0  # in +Inf


def test_figures_survive_the_store_record() -> None:
    fig = Figures(12, 1, {5.0: 10, math.inf: 12})
    back = Figures.from_record(fig.to_record())
    assert back == fig
