"""The snapshot bench runs end to end on a small synthetic mesh and prints sane figures."""

from __future__ import annotations

import json

import pytest

from nodeagent.bench.__main__ import main


def test_bench_snapshot_small(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-o", "json", "snapshot", "--services", "40", "--namespaces", "4", "--repeat", "3"]
    assert main(argv) == 0
    (result,) = json.loads(capsys.readouterr().out)
    figures = {f["metric"]: f["value"] for f in result["figures"]}
    assert figures["count workloads"] == 200
    assert figures["count endpoints"] == 40 * 2 * 5
    assert figures["count virtual_services"] == 4
    assert 0 < figures["apply 1 workload update (median)"] < figures["full build"]
