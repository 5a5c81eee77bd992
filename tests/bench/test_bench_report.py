"""Report rendering, the figures derived from measurement rows, and wrk output parsing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.bench import Result
from nodeagent.bench.mesh import figures, parse_wrk
from nodeagent.bench.mesh import run as mesh_run
from nodeagent.bench.report import chart_panels, render_markdown, rows_table
from nodeagent.bench.report import run as report_run


def row(setup: str, scenario: str = "l4", load: str = "1000/s", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scenario": scenario, "load": load, "setup": setup, "requests": 3000, "errors": 0,
        "rate": 1000.0, "p50_ms": 0.1, "p90_ms": 0.2, "p99_ms": 0.4, "p99.9_ms": 0.5,
        "mb_per_s": None, "wall_s": 4.0, "agent_cpu_s": 0.04, "requests_covered": 3500,
        "agent_rss_mib": {"n1": 60.0, "n2": 70.0},
    }  # fmt: skip
    base.update(kw)
    return base


def sample_result() -> Result:
    r = Result("mesh", {"duration_s": 3.0, "mesh_target": "vip"})
    r.rows = [
        row("direct"),
        row("mesh", p50_ms=0.3, p90_ms=0.6, p99_ms=1.0, agent_cpu_s=0.74, agent_cpu_ms_per_req=0.2),
        row("haproxy", p50_ms=0.2, p90_ms=0.3, p99_ms=0.5, haproxy_cpu_ms_per_req=0.05),
        row("direct", "http", "max", rate=40000.0),
        row("mesh", "http", "max", rate=6000.0),
        row("haproxy", "http", "max", rate=20000.0),
        row("direct", "bulk", "-", mb_per_s=2000.0, rate=0.0),
        row("mesh", "bulk", "-", mb_per_s=600.0, rate=0.0),
        row("haproxy", "bulk", "-", mb_per_s=900.0, rate=0.0),
    ]
    figures(r)
    r.meta = {
        "machine": {"cpu": "Test CPU", "cores": 2, "kernel": "6.1", "python": "3.11.7"},
        "command": "scripts/bench mesh --duration 3",
        "started": "2026-01-01T00:00:00+0000",
        "wall_s": 100.0,
    }
    r.notes.append("a note")
    return r


def fig(r: Result) -> dict[str, float]:
    return {f.metric: f.value for f in r.figures}


def test_figures_added_latency_ratios_cpu_and_throughput() -> None:
    f = fig(sample_result())
    assert f["l4 1000/s p90 added mesh"] == pytest.approx(0.4)
    assert f["l4 1000/s p99 added haproxy"] == pytest.approx(0.1)
    assert f["l4 1000/s p90 mesh/direct"] == pytest.approx(3.0)
    # 0.74 s in 4 s, minus the idle 0.04 s measured in the direct run, over 3500 requests.
    assert f["l4 1000/s agent CPU per 1000 req"] == pytest.approx(0.7 / 3500 * 1000)
    assert f["l4 1000/s agent vCPU"] == pytest.approx(0.2)
    assert f["l4 1000/s agent RSS max"] == 70.0
    assert f["http max rate mesh/direct"] == pytest.approx(0.15)
    assert f["bulk mesh/direct"] == pytest.approx(0.3)


def test_cpu_per_1000_requests_mesh_per_agent_haproxy_and_published() -> None:
    f = fig(sample_result())
    assert f["l4 1000/s mesh CPU per 1000 req"] == pytest.approx(0.2)
    assert f["l4 1000/s CPU per 1000 req per agent"] == pytest.approx(0.1)
    assert f["l4 1000/s haproxy CPU per 1000 req"] == pytest.approx(0.05)
    assert f["l4 1000/s CPU per 1000 req mesh/haproxy"] == pytest.approx(4.0)
    assert f["l4 1000/s per agent / ztunnel published 0.06"] == pytest.approx(0.1 / 0.06)
    md = render_markdown(sample_result().to_json())
    assert "## CPU per 1,000 requests" in md
    assert "On Test CPU;" in md
    assert "| l4 1000/s | 0.200 | 0.100 | 0.050 | 4.000 | ztunnel 0.06 |" in md


def test_markdown_has_machine_command_targets_and_rows() -> None:
    md = render_markdown(sample_result().to_json())
    assert "`scripts/bench mesh --duration 3`" in md
    assert "Test CPU, 2 cores, Linux 6.1, Python 3.11.7" in md
    assert "![latency percentiles per set-up](benchmarks-latency.png)" in md
    assert "| L4 at 1000/s: added p90, two agents | <= 0.5 | 0.400 ms | met |" in md
    assert "| L4 at 1000/s: agent CPU (both agents) | <= 0.15 | 0.200 vCPU | MISSED |" in md
    assert "[dataplane.md](dataplane.md#performance)" in md
    assert "| Bulk through the mesh vs direct | >= 0.5 | 0.300 ratio | MISSED |" in md
    assert "| l4 | 1000/s | mesh | 1000 | 0.300 | 0.600 | 1.000 |" in md
    assert "- note: a note" in md


def test_data_plane_v2_targets_with_the_connect_ratio_and_restarts() -> None:
    r = sample_result()
    r.rows += [
        row("direct", "connect", "max", rate=4000.0),
        row("mesh", "connect", "max", rate=2500.0),
        row("haproxy", "connect", "max", rate=1000.0),
    ]
    figures(r)
    r.add("restart 500/s graceful n1 failed", 0, "requests")
    r.add("restart 500/s graceful n2 failed", 3, "requests")
    md = render_markdown(r.to_json())
    v2 = md[md.index("## Targets (issue 14") : md.index("## Targets (issue 8")]
    assert "| L4 at 1000/s: added p90 | <= 0.3 | 0.400 ms | MISSED |" in v2
    assert "| New connections, max rate: mesh / HAProxy | >= 2 | 2.500 ratio | met |" in v2
    assert "| Graceful restart of n1's agent: failed requests | <= 0 | 0 requests | met |" in v2
    assert "| Graceful restart of n2's agent: failed requests | <= 0 | 3 requests | MISSED |" in v2
    assert "| HTTP at 1000/s: added p90 | <= 1 | not measured | - |" in v2


def test_churn_targets_count_failed_requests_and_the_added_p99() -> None:
    r = sample_result()
    churn = "1000/s 30s"
    r.rows += [
        row("direct", "churn", churn, p99_ms=0.5),
        row("mesh", "churn", churn, p99_ms=2.5, errors=7),
        row("haproxy", "churn", churn, p99_ms=3.0),
    ]
    figures(r)
    f = fig(r)
    assert f["churn 1000/s 30s failed mesh"] == 7
    assert f["churn 1000/s 30s failed haproxy"] == 0
    assert f["churn 1000/s 30s p99 added mesh"] == pytest.approx(2.0)
    md = render_markdown(r.to_json())
    v2 = md[md.index("## Targets (issue 14") : md.index("## Targets (issue 8")]
    assert "| New connections sustained, 1000/s for 30 s: added p99 | <= 3 | 2.000 ms | met |" in v2
    assert (
        "| New connections sustained, 1000/s for 30 s: failed | <= 0 | 7 requests | MISSED |" in v2
    )


def test_rows_table_aligns_columns() -> None:
    lines = rows_table(sample_result().rows).splitlines()
    assert len(lines) == 1 + 9
    assert len({len(line) for line in lines}) == 1
    assert "haproxy" in lines[3]


def test_chart_panels_skip_max_and_bulk() -> None:
    panels = chart_panels(sample_result().to_json())
    assert [p.title for p in panels] == ["l4 1000/s"]
    assert panels[0].values[1] == [0.2, 0.6, 0.3]  # p90 per set-up


def test_chart_panels_show_a_mean_without_percentiles_and_leave_out_empty_groups() -> None:
    r = sample_result()
    no_percentiles = {"p50_ms": None, "p90_ms": None, "p99_ms": None, "p99.9_ms": None}
    r.rows += [
        row("direct", "h2", "1000/s", **no_percentiles, mean_ms=0.3),
        row("mesh", "h2", "1000/s", **no_percentiles, mean_ms=2.0),
        row("haproxy", "h2", "1000/s", **no_percentiles, mean_ms=0.5),
        row("mesh", "restart", "500/s graceful n1", **{**no_percentiles, "p99_ms": 30.0}),
        row("mesh", "grpc", "100/s", **no_percentiles),
    ]
    panels = {p.title: p for p in chart_panels(r.to_json())}
    assert list(panels) == ["l4 1000/s", "h2 1000/s", "restart 500/s graceful n1"]
    assert panels["h2 1000/s"].groups == ("mean",)
    assert panels["h2 1000/s"].values == [[0.3, 2.0, 0.5]]
    assert panels["restart 500/s graceful n1"].groups == ("p99",)
    assert panels["restart 500/s graceful n1"].values == [[None, 30.0, None]]


def test_report_writes_markdown_and_png(tmp_path: Path) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps(sample_result().to_json()))
    md = tmp_path / "docs" / "benchmarks.md"
    assert report_run(argparse.Namespace(source=str(src), md=str(md))) == 0
    assert md.read_text().startswith("# Benchmarks")
    assert (md.parent / "benchmarks-latency.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_a_file_without_a_mesh_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps([{"bench": "snapshot"}]))
    assert report_run(argparse.Namespace(source=str(src), md=str(tmp_path / "x.md"))) == 1
    assert "holds no mesh run" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


WRK = """Running 3s test @ http://10.201.2.2:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   365.12us  120.00us   4.00ms   90.00%
  Latency Distribution
     50%  340.00us
     75%  400.00us
     90%  520.00us
     99%    1.20ms
  131072 requests in 3.00s, 11.38MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  43690.67
Transfer/sec:      3.79MB
"""


def test_parse_wrk() -> None:
    out = parse_wrk(WRK)
    assert out["achieved_rate"] == pytest.approx(43690.67)
    assert out["requests"] == 131072
    assert out["errors"] == 3
    assert out["latency_ms"] == pytest.approx({"p50": 0.34, "p90": 0.52, "p99": 1.2})
    with pytest.raises(ValueError, match="no Requests/sec"):
        parse_wrk("garbage")


def test_destination_l7_on_vs_off_figures_and_section() -> None:
    r = Result("mesh", {"duration_s": 3.0})
    on_cpu = {"n1": 1.2, "n2": 1.0}
    off_cpu = {"n1": 0.4, "n2": 0.3}
    r.rows = [
        row("mesh", "http", "100/s", p50_ms=3.0, p90_ms=5.0, p99_ms=9.0,
            agent_cpu_s_by_node=on_cpu, requests_covered=1000),
        row("mesh", "http-l4", "100/s", p50_ms=1.0, p90_ms=2.0, p99_ms=4.0,
            agent_cpu_s_by_node=off_cpu, requests_covered=1000),
        row("mesh", "http", "max", rate=500.0, agent_cpu_s_by_node=on_cpu, requests_covered=2000),
        row("mesh", "http-l4", "max", rate=1800.0, agent_cpu_s_by_node=off_cpu,
            requests_covered=4000),
    ]  # fmt: skip
    figures(r)
    f = fig(r)
    assert f["http L7 on-off 100/s p50"] == pytest.approx(2.0)
    assert f["http L7 on-off 100/s p99"] == pytest.approx(5.0)
    assert f["http 100/s destination agent CPU per 1000 req L7 added"] == pytest.approx(0.7)
    assert f["http 100/s source agent CPU per 1000 req L7 on"] == pytest.approx(1.2)
    assert f["http max destination agent CPU per 1000 req L7 on"] == pytest.approx(0.5)
    assert f["http max destination agent CPU per 1000 req L7 off"] == pytest.approx(0.075)
    assert f["http L7 off max rate"] == 1800.0
    md = render_markdown(json.loads(json.dumps(r.to_json())), png_name=None)
    assert "## Destination L7: on vs off" in md
    assert "Max rate with L7 off: 1,800 req/s." in md
    (line,) = [x for x in md.splitlines() if x.startswith("| 100/s |") and "0.700" in x]
    assert line.split(" | ")[1:4] == ["2.000", "3.000", "5.000"]
    assert "the destination parses, authenticates" in md
    # A `--destination-l7 when-needed` run says what its `http` rows measured.
    r.parameters["destination_l7"] = "when-needed"
    md = render_markdown(json.loads(json.dumps(r.to_json())), png_name=None)
    assert "the destination relays it at L4, `--destination-l7 when-needed`" in md
    assert "the destination parses, authenticates" not in md


def test_profile_without_py_spy_stops_before_a_sandbox(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    args = argparse.Namespace(scenarios="l4", rates="100", profile=str(tmp_path / "p"))
    with pytest.raises(SystemExit, match="--profile needs py-spy"):
        mesh_run(args)  # raises before anything reads the arguments a sandbox needs
