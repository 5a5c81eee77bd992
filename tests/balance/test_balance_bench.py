"""The balance micro-benchmark runs and reports a positive µs figure for every balancer."""

from __future__ import annotations

import argparse

from nodeagent.bench import balance


def test_bench_balance_small() -> None:
    parser = argparse.ArgumentParser()
    balance.add_arguments(parser)
    args = parser.parse_args(["--endpoints", "4", "--picks", "500"])
    result = balance.run(args)
    figures = {f.metric: (f.value, f.unit) for f in result.figures}
    for name in ("peak_ewma", "round_robin", "least_request", "random", "ring_hash", "maglev"):
        value, unit = figures[f"{name} pick"]
        assert unit == "µs"
        assert 0 < value < 1000
        assert figures[f"{name} request"][0] > 0
    assert figures["maglev build"][1] == "ms"
    assert result.parameters == {"endpoints": 4, "picks": 500}
