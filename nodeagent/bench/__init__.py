"""Benchmarks, run by `scripts/bench [NAME…] [-o json]`: one module per subject.

Each module exposes `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> Result`; the
runner (`__main__`) prints every result as a table, or all of them as one JSON document.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Figure:
    metric: str
    value: float
    unit: str


@dataclass(slots=True)
class Result:
    bench: str
    parameters: dict[str, object] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)

    def add(self, metric: str, value: float, unit: str) -> None:
        self.figures.append(Figure(metric, value, unit))
