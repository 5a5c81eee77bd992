"""The snapshot bench runs end to end on a small synthetic mesh (no timing is checked)."""

from __future__ import annotations

import json

import pytest

from nodeagent.bench.__main__ import main

SMALL = ["--services", "40", "--namespaces", "4", "--repeat", "3", "--burst", "20"]


def test_bench_snapshot_small(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-o", "json", "snapshot", *SMALL, "--baseline", "none"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    figures = {f["metric"]: f["value"] for f in result["figures"]}
    assert figures["count workloads"] == 200
    assert figures["count endpoints"] == 40 * 2 * 5
    assert figures["count virtual_services"] == 4
    assert figures["bytes per workload (before endpoint lookups)"] > 0
    assert {r["metric"] for r in result["rows"]} == set(figures)


def test_bench_snapshot_side_by_side_with_a_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    # HEAD as its own baseline: the worktree, the copied bench and the subprocess all work
    assert main(["snapshot", *SMALL, "--baseline", "HEAD"]) == 0
    out = capsys.readouterr().out
    assert "baseline HEAD" in out
    assert "apply 1 workload update (p99)" in out
