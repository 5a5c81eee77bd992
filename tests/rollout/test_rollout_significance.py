"""The two-proportion z-test of `meshctl ab report`."""

from __future__ import annotations

import pytest

from nodeagent.rollout.significance import two_proportion


def test_a_clear_difference_is_significant() -> None:
    s = two_proportion(990, 1000, 900, 1000)
    assert s.significant
    assert s.z is not None
    assert s.z < -8
    assert s.p_value is not None
    assert s.p_value < 1e-10


def test_a_small_difference_on_few_requests_is_not() -> None:
    s = two_proportion(98, 100, 97, 100)
    assert not s.significant
    assert s.p_value == pytest.approx(0.6505, abs=1e-3)  # textbook: z = -0.453


def test_too_few_requests_and_no_failures_give_no_verdict() -> None:
    assert two_proportion(5, 5, 4, 5).reason.startswith("too few requests")
    assert two_proportion(100, 100, 50, 50).significant is False
