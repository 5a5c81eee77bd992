"""Benchmarks, run by `scripts/bench [NAME…] [-o json]`: one module per subject.

Each module exposes `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> Result`; the
runner (`__main__`) prints every result as a table, or all of them as one JSON document.
`scripts/bench report` renders the last saved run into docs/benchmarks.md (`report`).
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
    # Optional detail: one row per measurement (scenario, load, set-up), free-form notes, and
    # the machine/command the run happened on; printed as a grid and kept in the JSON.
    rows: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)

    def add(self, metric: str, value: float, unit: str) -> None:
        self.figures.append(Figure(metric, value, unit))

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "bench": self.bench,
            "parameters": self.parameters,
            "figures": [
                {"metric": f.metric, "value": f.value, "unit": f.unit} for f in self.figures
            ],
        }
        if self.rows:
            doc["rows"] = self.rows
        if self.notes:
            doc["notes"] = self.notes
        if self.meta:
            doc["meta"] = self.meta
        return doc
