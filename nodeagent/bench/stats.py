"""Latency statistics for the benchmarks: percentiles, the constant-rate schedule, and recording
that corrects for coordinated omission.

A closed-loop client (send, wait, send) stops sending while the system under test stalls, so the
stall shows up as ONE slow request instead of every request that should have been sent during it
("coordinated omission"). The open-loop generator instead fixes request i's *intended* send time
at `start + i / rate` and measures every latency from that time, never from when the request
actually left: a stall then costs every request scheduled during it, as real users would see it
(wrk2's approach). Everything here is pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `samples`, nearest-rank on sorted data (as HdrHistogram).

    Raises ValueError on no samples or q outside 0-100: a figure from nothing is not a figure.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(samples: Sequence[float], qs: Iterable[float] = PERCENTILES) -> dict[str, float]:
    """`{"p50": …, "p90": …, "p99": …, "p99.9": …, "max": …, "mean": …}` of `samples`."""
    if not samples:
        raise ValueError("summary of no samples")
    ordered = sorted(samples)
    out: dict[str, float] = {}
    for q in qs:
        rank = max(1, math.ceil(q / 100.0 * len(ordered)))
        out[f"p{q:g}"] = ordered[rank - 1]
    out["max"] = ordered[-1]
    out["mean"] = sum(ordered) / len(ordered)
    return out


@dataclass(frozen=True, slots=True)
class Schedule:
    """Constant-rate schedule: request i is due at `start + i / rate` (seconds)."""

    start: float
    rate: float

    def __post_init__(self) -> None:
        if not self.rate > 0 or math.isinf(self.rate):
            raise ValueError(f"rate must be a positive number of requests/s, not {self.rate}")

    def intended(self, i: int) -> float:
        return self.start + i / self.rate

    def due(self, now: float) -> int:
        """How many requests are due by `now` (so indexes 0 … due-1 should have been sent)."""
        if now < self.start:
            return 0
        return math.floor((now - self.start) * self.rate) + 1


class Recorder:
    """Latency samples (seconds) measured from each request's intended send time.

    `record(intended, sent, done)` keeps both views: `latencies` (from the intended time: the
    corrected one the figures use) and `service_times` (from the actual send: what a closed-loop
    client would have reported), so the size of the correction is visible.
    """

    __slots__ = ("errors", "latencies", "service_times")

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.service_times: list[float] = []
        self.errors = 0

    def record(self, intended: float, sent: float, done: float) -> None:
        if sent < intended or done < sent:
            raise ValueError(f"times out of order: intended {intended}, sent {sent}, done {done}")
        self.latencies.append(done - intended)
        self.service_times.append(done - sent)

    def error(self) -> None:
        self.errors += 1

    def __len__(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict[str, float]:
        """Corrected percentiles in milliseconds, plus the uncorrected p99 for comparison."""
        if not self.latencies:
            return {}
        ms = [x * 1000.0 for x in self.latencies]
        out = summarize(ms)
        out["uncorrected_p99"] = percentile([x * 1000.0 for x in self.service_times], 99.0)
        return out
