"""Metric families as plain data (`FamilyState`), and their sum: one exposition for many processes.

With `nodeagent run --workers N` every worker process counts into its own registry; the control
process pulls each registry's `state()` (msgpack-able dicts) and renders the sum with its own
(`MetricsRegistry.add_peers`). Counters, gauges and histogram buckets add up per label tuple; a
family whose kind, label names or buckets differ from the first one seen under its name cannot
be added and is left out (reported in `MergeResult.conflicts`), never mixed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nodeagent.telemetry.metrics import Counter, Gauge, Histogram, Metric

# {"name", "kind", "help", "labels": [...], "buckets": [...] (histograms),
#  "values": [[label values, value]] or, for histograms, [[label values, counts, sum, count]]}
FamilyState = dict[str, Any]


def family_state(metric: Metric) -> FamilyState | None:
    """`metric` as data; None for a metric type this module does not know."""
    if isinstance(metric, Histogram):
        return {
            "name": metric.name,
            "kind": "histogram",
            "help": metric.help,
            "labels": list(metric.label_names),
            "buckets": list(metric.buckets),
            "values": [
                [list(labels), list(s.counts), s.sum, s.count]
                for labels, s in metric.series.items()
            ],
        }
    if isinstance(metric, Counter):  # Gauge is a Counter
        return {
            "name": metric.name,
            "kind": metric.kind,
            "help": metric.help,
            "labels": list(metric.label_names),
            "values": [[list(labels), value] for labels, value in metric.values.items()],
        }
    return None


@dataclass(slots=True)
class MergeResult:
    families: dict[str, FamilyState] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)


def _compatible(a: FamilyState, b: FamilyState) -> bool:
    return (
        a["kind"] == b["kind"]
        and list(a["labels"]) == list(b["labels"])
        and list(a.get("buckets") or ()) == list(b.get("buckets") or ())
    )


def merge_states(groups: Iterable[Iterable[FamilyState]]) -> MergeResult:
    """The sum of every group (one group per process), family by family, label tuple by tuple."""
    out = MergeResult()
    sums: dict[str, dict[tuple[str, ...], Any]] = {}
    for group in groups:
        for fam in group:
            name = fam["name"]
            first = out.families.get(name)
            if first is None:
                first = out.families[name] = {k: v for k, v in fam.items() if k != "values"}
                sums[name] = {}
            elif not _compatible(first, fam):
                out.conflicts.append(name)
                continue
            values = sums[name]
            if fam["kind"] == "histogram":
                for labels, counts, total, count in fam["values"]:
                    key = tuple(labels)
                    prev = values.get(key)
                    if prev is None:
                        values[key] = [list(counts), total, count]
                    else:
                        prev[0] = [x + y for x, y in zip(prev[0], counts, strict=True)]
                        prev[1] += total
                        prev[2] += count
            else:
                for labels, value in fam["values"]:
                    key = tuple(labels)
                    values[key] = values.get(key, 0) + value
    for name, fam in out.families.items():
        if fam["kind"] == "histogram":
            fam["values"] = [[list(k), v[0], v[1], v[2]] for k, v in sums[name].items()]
        else:
            fam["values"] = [[list(k), v] for k, v in sums[name].items()]
    return out


def metric_of(fam: FamilyState) -> Metric:
    """A renderable metric holding `fam`'s values."""
    kind = fam["kind"]
    if kind == "histogram":
        h = Histogram(fam["name"], fam["help"], fam["labels"], fam["buckets"])
        for labels, counts, total, count in fam["values"]:
            series = h.series_for(tuple(labels))
            series.counts = list(counts)
            series.sum = total
            series.count = count
        return h
    metric: Counter = (
        Gauge(fam["name"], fam["help"], fam["labels"])
        if kind == "gauge"
        else (Counter(fam["name"], fam["help"], fam["labels"]))
    )
    for labels, value in fam["values"]:
        metric.values[tuple(labels)] = value
    return metric
