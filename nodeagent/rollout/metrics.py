"""From scrapes of Istio's metrics to per-subset figures over a window (pure, no I/O).

A `Counters` holds the counter series that matter for one host, read at one moment from every
source (each agent's 15020 endpoint, or Prometheus): `istio_requests_total` and the
`istio_request_duration_milliseconds` buckets, as reported by the client side (reporter
"source": it sees every request, also those the destination never answered), keyed by
(instance, metric, destination version, response code, bucket bound). `window(before, after)`
is what happened in between, per destination version: counter increases with Prometheus'
reset rule (a counter that went down restarted from zero). `Figures` gives the success rate
(non-5xx share, Flagger's request-success-rate) and latency quantiles interpolated inside
the histogram buckets exactly as PromQL's `histogram_quantile` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nodeagent.telemetry.exposition import Sample

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
WANTED = (REQUESTS, DURATION_BUCKET)

# (instance, metric, destination_version, response_code, le); le is "" for the request counter.
SeriesKey = tuple[str, str, str, str, str]
Counters = dict[SeriesKey, float]


def select(instance: str, samples: Iterable[Sample], host_fqdn: str) -> Counters:
    """The series of `samples` about requests to `host_fqdn`, summed over the other labels.

    A marker series (metric "") records that `instance` was read, also when it had none."""
    out: Counters = {(instance, "", "", "", ""): 0.0}
    for s in samples:
        if s.name not in WANTED:
            continue
        labels = s.labels
        if labels.get("reporter") != "source" or labels.get("destination_service") != host_fqdn:
            continue
        key = (
            instance,
            s.name,
            labels.get("destination_version", "unknown"),
            labels.get("response_code", ""),
            labels.get("le", "") if s.name == DURATION_BUCKET else "",
        )
        out[key] = out.get(key, 0.0) + s.value
    return out


@dataclass(slots=True)
class Figures:
    """One destination version over one window."""

    requests: float = 0.0
    failures: float = 0.0  # 5xx and requests without a response (code 0)
    buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count

    @property
    def success_rate(self) -> float | None:
        """Percent of requests that did not fail; None without requests."""
        if self.requests <= 0:
            return None
        return 100.0 * (self.requests - self.failures) / self.requests

    def quantile(self, q: float) -> float | None:
        """PromQL's histogram_quantile over the buckets; None without observations."""
        bounds = sorted(self.buckets)
        if not bounds or not math.isinf(bounds[-1]):
            return None
        total = self.buckets[bounds[-1]]
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for le in bounds:
            count = self.buckets[le]
            if count >= rank:
                if math.isinf(le):
                    return lower  # in the +Inf bucket: the highest finite bound
                if count == below:
                    return le
                return lower + (le - lower) * (rank - below) / (count - below)
            lower, below = le, count
        return lower

    def add(self, other: Figures) -> None:
        self.requests += other.requests
        self.failures += other.failures
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n

    def to_record(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "buckets": [[_le_text(le), n] for le, n in sorted(self.buckets.items())],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Figures:
        raw = record.get("buckets")
        buckets: dict[float, float] = {}
        if isinstance(raw, list):
            for item in raw:
                if isinstance(item, list) and len(item) == 2:
                    buckets[_le_value(str(item[0]))] = float(item[1])
        return cls(_num(record.get("requests")), _num(record.get("failures")), buckets)


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _le_text(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(le)


def _le_value(text: str) -> float:
    try:
        return float(text.replace("+Inf", "inf"))
    except ValueError:
        return math.inf


def _failed(code: str) -> bool:
    return code == "0" or code.startswith("5")


def increase(before: float | None, after: float) -> float:
    """A counter's increase; a counter lower than before was reset and counts from zero."""
    if before is None or after < before:
        return after
    return after - before


def window(before: Counters, after: Counters) -> dict[str, Figures]:
    """Per destination version: what the counters say happened between the two readings.

    Series only in `after` count from zero when `before` read their instance (a first request
    since then); an instance missing from `before` (not read then) contributes nothing."""
    seen_instances = {k[0] for k in before}
    out: dict[str, Figures] = {}
    for key, value in after.items():
        instance, metric, version, code, le = key
        if instance not in seen_instances or not metric:
            continue
        delta = increase(before.get(key), value) if key in before else value
        if delta <= 0:
            continue
        fig = out.setdefault(version, Figures())
        if metric == REQUESTS:
            fig.requests += delta
            if _failed(code):
                fig.failures += delta
        else:
            bound = _le_value(le)
            fig.buckets[bound] = fig.buckets.get(bound, 0.0) + delta
    return out
