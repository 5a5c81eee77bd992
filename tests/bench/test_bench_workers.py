"""The `--workers` scaling summary: medians per worker count, the ratio of mesh/HAProxy, CPU per
request, and its section in the report."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.bench.report import render_markdown
from nodeagent.bench.workers import condense, summarize


def run(workers: int, l4: float, http: float, hap: float, cpu: float) -> dict[str, Any]:
    def r(sc: str, setup: str, rate: float, **kw: Any) -> dict[str, Any]:
        return {"scenario": sc, "load": "max", "setup": setup, "rate": rate, **kw}

    return {
        "parameters": {"workers": workers},
        "meta": {"started": f"t{l4}"},
        "rows": [
            r("l4", "mesh", l4, agent_cpu_ms_per_req=cpu),
            r("l4", "haproxy", hap),
            r("http", "mesh", http, agent_cpu_ms_per_req=cpu * 4),
            r("http", "haproxy", hap),
            {"scenario": "l4", "load": "1000/s", "setup": "mesh", "rate": 1000.0},
        ],
    }


def test_scaling_is_the_ratio_of_median_mesh_per_haproxy() -> None:
    runs = [
        condense(run(1, 1000, 100, 10000, 0.2), "a"),
        condense(run(1, 3000, 300, 10000, 0.2), "b"),
        condense(run(2, 3000, 200, 10000, 0.3), "c"),
        condense(run(2, 5000, 400, 10000, 0.3), "d"),
    ]
    s = summarize(runs)
    assert s["by_workers"]["1"]["l4_mesh_per_haproxy"] == 0.2  # median of 0.1 and 0.3
    assert s["by_workers"]["2"]["l4_mesh_per_haproxy"] == 0.4
    assert s["scaling"]["l4 2/1"] == 2.0
    assert s["scaling"]["http 2/1"] == 1.5
    assert s["scaling"]["l4 cpu per request 2/1"] == 1.5
    md = render_markdown({"rows": [], "figures": []}, None, s)
    assert "## Worker processes (`--workers`)" in md
    assert "| 2 | 2 | 4,000 | 0.4 |" in md
    assert "l4 2/1 = 2" in md


def test_a_run_without_max_rows_is_refused() -> None:
    doc = run(1, 1, 1, 1, 0.1)
    doc["rows"] = doc["rows"][:1]
    with pytest.raises(ValueError, match="no l4 max-rate rows"):
        condense(doc, "x.json")
