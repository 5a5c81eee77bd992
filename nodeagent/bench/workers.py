"""How max rates scale with the agents' worker processes: `scripts/bench mesh --workers N` runs,
condensed (`summarize`) into docs/benchmarks-workers.json and rendered (`section`) by
`scripts/bench report` into docs/benchmarks.md. Pure.

Each run measures direct, mesh and HAProxy back to back, so mesh/HAProxy in one run is the
figure least moved by what else the shared machine runs; the scaling ratio is the median of that
ratio with N workers over its median with one. Agent CPU per request (the agents and their
workers) says what the process split costs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

SCENARIOS = ("l4", "http")


def condense(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """One mesh run's max-rate figures."""
    rows = {(r["scenario"], r["setup"]): r for r in doc.get("rows") or [] if r["load"] == "max"}
    out: dict[str, Any] = {
        "source": source,
        "workers": int((doc.get("parameters") or {}).get("workers", 1)),
        "started": (doc.get("meta") or {}).get("started"),
    }
    for sc in SCENARIOS:
        mesh, hap = rows.get((sc, "mesh")), rows.get((sc, "haproxy"))
        if mesh is None or hap is None:
            raise ValueError(f"{source}: no {sc} max-rate rows for mesh and haproxy")
        out[f"{sc}_mesh"] = mesh["rate"]
        out[f"{sc}_haproxy"] = hap["rate"]
        out[f"{sc}_mesh_per_haproxy"] = round(mesh["rate"] / hap["rate"], 4) if hap["rate"] else 0
        out[f"{sc}_agent_cpu_ms_per_req"] = mesh.get("agent_cpu_ms_per_req")
    return out


def summarize(runs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    rows = sorted(runs, key=lambda r: (r["workers"], r.get("started") or ""))
    by: dict[int, dict[str, Any]] = {}
    for n in sorted({r["workers"] for r in rows}):
        mine = [r for r in rows if r["workers"] == n]
        med: dict[str, Any] = {"runs": len(mine)}
        for sc in SCENARIOS:
            for key in ("mesh", "mesh_per_haproxy", "agent_cpu_ms_per_req"):
                values = [r[f"{sc}_{key}"] for r in mine if r.get(f"{sc}_{key}") is not None]
                med[f"{sc}_{key}"] = round(statistics.median(values), 4) if values else None
        by[n] = med
    scaling: dict[str, Any] = {}
    if 1 in by:
        for n, med in by.items():
            if n == 1:
                continue
            for sc in SCENARIOS:
                base = by[1][f"{sc}_mesh_per_haproxy"]
                if base:
                    scaling[f"{sc} {n}/1"] = round(med[f"{sc}_mesh_per_haproxy"] / base, 3)
                cpu1, cpun = by[1][f"{sc}_agent_cpu_ms_per_req"], med[f"{sc}_agent_cpu_ms_per_req"]
                if cpu1 and cpun:
                    scaling[f"{sc} cpu per request {n}/1"] = round(cpun / cpu1, 3)
    return {"runs": rows, "by_workers": {str(k): v for k, v in by.items()}, "scaling": scaling}


def _f(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v >= 100:
        return f"{v:,.0f}"
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def section(summary: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Worker processes (`--workers`)",
        "",
        "Max rates through both agents with `scripts/bench mesh --workers N --scenarios l4,http "
        "--rates ''` (medians over the runs; mesh/HAProxy from the same run; agent CPU covers",
        "the agents and their workers). This machine has 2 cores shared by the load generator,",
        "the servers, HAProxy and both agents (and, when measured, other work): see",
        "[dataplane.md](dataplane.md#processes-nodeagent-run---workers-n-nodeagentworkers) for",
        "what the figures say and how they extrapolate.",
        "",
        "| workers | runs | L4 mesh req/s | L4 mesh/HAProxy | L4 agent CPU ms/req "
        "| HTTP mesh req/s | HTTP mesh/HAProxy | HTTP agent CPU ms/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, m in summary.get("by_workers", {}).items():
        lines.append(
            f"| {n} | {m['runs']} | {_f(m['l4_mesh'])} | {_f(m['l4_mesh_per_haproxy'])} "
            f"| {_f(m['l4_agent_cpu_ms_per_req'])} | {_f(m['http_mesh'])} "
            f"| {_f(m['http_mesh_per_haproxy'])} | {_f(m['http_agent_cpu_ms_per_req'])} |"
        )
    scaling = summary.get("scaling") or {}
    if scaling:
        lines += ["", "Scaling: " + ", ".join(f"{k} = {v:g}" for k, v in scaling.items()) + "."]
    return lines
