"""Is variant B's success rate different from A's? A two-proportion z-test (pure).

The pooled two-sided z-test on the success proportions, at 95% confidence (|z| > 1.96, the
p-value below 0.05). It needs enough requests on both sides for the normal approximation:
at least MIN_REQUESTS each, and at least one success and one failure pooled (two variants
that both never fail do not differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95
MIN_REQUESTS = 30
TEST_NAME = "two-proportion z-test on success rate, two-sided, 95% confidence"


@dataclass(frozen=True, slots=True)
class Significance:
    z: float | None
    p_value: float | None
    significant: bool
    reason: str


def two_proportion(successes_a: float, n_a: float, successes_b: float, n_b: float) -> Significance:
    if n_a < MIN_REQUESTS or n_b < MIN_REQUESTS:
        return Significance(None, None, False, f"too few requests (need {MIN_REQUESTS} per side)")
    pooled = (successes_a + successes_b) / (n_a + n_b)
    spread = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    if spread <= 0:
        return Significance(0.0, 1.0, False, "no failures (or no successes) on either side")
    z = (successes_b / n_b - successes_a / n_a) / math.sqrt(spread)
    p = math.erfc(abs(z) / math.sqrt(2))
    significant = p < 1 - CONFIDENCE
    return Significance(z, p, significant, "significant" if significant else "not significant")
