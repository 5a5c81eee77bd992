"""Smoke test of the data-plane bench: the smallest scenario on a real 2-node sandbox.

L4 request/response at 1000 requests/s for ~2 s per set-up: all three set-ups must carry every
request with sane latencies, the mesh run must cost the agents CPU, and nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest

from nodeagent.bench import mesh

pytestmark = [pytest.mark.root, pytest.mark.slow]


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def test_l4_fixed_rate_through_all_three_setups(tmp_path: Path) -> None:
    name = f"bs{os.getpid() % 100000}"
    out = tmp_path / "mesh.json"
    args = argparse.Namespace(
        duration=2.0, warmup=0.3, rates="1000", no_max=True, scenarios="l4,churn", connections=8,
        churn_rate=300.0, churn_duration=3.0,
        size=64, bulk_mib=1, bulk_transfers=1, propagation_samples=3, enroll_pods=0,
        name=name, out=str(out), argv=["mesh", "--scenarios", "l4,churn"], restart=False,
    )  # fmt: skip
    result = mesh.run(args)

    rows = {r["setup"]: r for r in result.rows if r["scenario"] == "l4"}
    assert sorted(rows) == ["direct", "haproxy", "mesh"]
    for setup, r in rows.items():
        assert r["errors"] == 0, (setup, r)
        assert 1900 <= r["requests"] <= 2100, (setup, r)  # 1000/s for 2 s
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] < 1000, (setup, r)
    # The mesh run crossed both agents; the direct one did not.
    assert rows["mesh"]["agent_cpu_s"] > rows["direct"]["agent_cpu_s"]
    assert rows["haproxy"]["haproxy_cpu_s"] > 0
    figures = {f.metric: f.value for f in result.figures}
    assert "l4 1000/s p90 added mesh" in figures
    assert figures["config propagation p50"] > 0
    assert 0 < figures["l4 1000/s agent RSS max"] < 1024
    # churn: a new connection per request at its own rate and length, every set-up.
    churn = {r["setup"]: r for r in result.rows if r["scenario"] == "churn"}
    assert sorted(churn) == ["direct", "haproxy", "mesh"]
    for setup, r in churn.items():
        assert r["load"] == "300/s 3s", (setup, r)
        assert r["errors"] == 0, (setup, r)
        assert 850 <= r["requests"] <= 950, (setup, r)  # 300/s for 3 s
        # The warm-up's requests are counted in the CPU figure's span as well.
        assert 950 <= r["requests_covered"] <= 1090, (setup, r)
    assert "churn 300/s 3s p99 added mesh" in figures
    assert figures["churn 300/s 3s agent CPU per 1000 req"] > 0
    saved = json.loads(out.read_text())
    assert saved["bench"] == "mesh"
    assert len(saved["rows"]) == 6
    assert saved["parameters"]["churn"] == "300/s for 3 s"
    assert saved["meta"]["command"] == "scripts/bench mesh --scenarios l4,churn"
    # Torn down: no namespace of the sandbox, no state dir.
    assert not [n for n in netns_names() if n.startswith(f"{name}-")]
    assert not Path(f"/run/nodeagent-sandbox/{name}").exists()
