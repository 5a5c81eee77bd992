"""`scripts/bench report`: render the last `mesh` run (its JSON) into docs/benchmarks.md + a PNG.

Rendering is pure (`render_markdown`, `rows_table`, `chart_panels` take the run's JSON document);
`run` only reads the JSON and writes the two files. The targets are issue 8's (the first data
plane) and issue 14's (data plane v2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nodeagent.bench.png import Panel, bar_chart
from nodeagent.bench.workers import condense, summarize
from nodeagent.bench.workers import section as workers_section

NAME = "report"
HELP = "regenerate docs/benchmarks.md and its chart from the last saved mesh run"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_JSON = REPO / "docs" / "benchmarks.json"
DEFAULT_MD = REPO / "docs" / "benchmarks.md"
PNG_NAME = "benchmarks-latency.png"
WORKERS_JSON = "benchmarks-workers.json"  # beside the run JSON
SETUPS = ("direct", "mesh", "haproxy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", default=str(DEFAULT_JSON), help="run JSON")
    parser.add_argument("--md", default=str(DEFAULT_MD), help="markdown to write")
    parser.add_argument(
        "--workers-runs",
        nargs="*",
        default=[],
        metavar="JSON",
        help="`scripts/bench mesh --workers N --out FILE` runs to condense into "
        f"{WORKERS_JSON} (rendered as the worker-processes section)",
    )


# (label, figure metric, comparison, limit): figure must be <= (or >=) limit.
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("L4 at 1000/s: added p90, two agents", "l4 1000/s p90 added mesh", "<=", 0.5),
    ("L4 at 1000/s: agent CPU (both agents)", "l4 1000/s agent vCPU", "<=", 0.15),
    ("L4 at 1000/s: agent RSS (MiB)", "l4 1000/s agent RSS max", "<=", 80.0),
    ("HTTP with routing at 1000/s: added p90", "http 1000/s p90 added mesh", "<=", 1.5),
    ("HTTP max rate through two agents (req/s)", "http max rate mesh", ">=", 5000.0),
    ("Bulk through the mesh vs direct", "bulk mesh/direct", ">=", 0.5),
)
TARGETS_V2: tuple[tuple[str, str, str, float], ...] = (
    ("HTTP at 1000/s: added p90", "http 1000/s p90 added mesh", "<=", 1.0),
    ("New connections at 1000/s: added p99", "connect 1000/s p99 added mesh", "<=", 3.0),
    ("New connections, max rate: mesh / HAProxy", "connect max rate mesh/haproxy", ">=", 2.0),
    (
        "New connections sustained, 1000/s for 30 s: added p99",
        "churn 1000/s 30s p99 added mesh",
        "<=",
        3.0,
    ),
    ("New connections sustained, 1000/s for 30 s: failed", "churn 1000/s 30s failed mesh", "<=", 0),
    ("Bulk through the mesh vs direct", "bulk mesh/direct", ">=", 0.23),
    ("L4 at 1000/s: added p90", "l4 1000/s p90 added mesh", "<=", 0.3),
    (
        "Graceful restart of n1's agent: failed requests",
        "restart 500/s graceful n1 failed",
        "<=",
        0,
    ),
    (
        "Graceful restart of n2's agent: failed requests",
        "restart 500/s graceful n2 failed",
        "<=",
        0,
    ),
)


def derived_figures(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Ratios between figures of the same run that the targets name (mesh over HAProxy)."""
    out = dict(figures)
    mesh, haproxy = figures.get("connect max rate mesh"), figures.get("connect max rate haproxy")
    if mesh and haproxy and haproxy["value"]:
        value = mesh["value"] / haproxy["value"]
        out["connect max rate mesh/haproxy"] = {"value": value, "unit": "ratio"}
    return out


def targets_section(
    title: str, targets: Sequence[tuple[str, str, str, float]], figures: dict[str, Any]
) -> list[str]:
    rows = []
    for label, metric, cmp, limit in targets:
        f = figures.get(metric)
        if f is None:
            rows.append([label, f"{cmp} {limit:g}", "not measured", "-"])
            continue
        value = float(f["value"])
        ok = value <= limit if cmp == "<=" else value >= limit
        rows.append(
            [
                label,
                f"{cmp} {limit:g}",
                f"{_fmt(f['value'])} {f['unit']}",
                "met" if ok else "MISSED",
            ]
        )
    return ["", f"## {title}", "", *_md_table(["target", "limit", "measured", ""], rows)]


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    if isinstance(v, dict):
        return "/".join(_fmt(x, 1) for x in v.values())
    return str(v)


COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], object]], ...] = (
    ("scenario", "scenario", lambda r: r.get("scenario")),
    ("load", "load", lambda r: r.get("load")),
    ("setup", "set-up", lambda r: r.get("setup")),
    ("rate", "req/s", lambda r: round(r["rate"]) if r.get("rate") else None),
    ("p50", "p50 ms", lambda r: r.get("p50_ms")),
    ("p90", "p90 ms", lambda r: r.get("p90_ms")),
    ("p99", "p99 ms", lambda r: r.get("p99_ms")),
    ("p999", "p99.9 ms", lambda r: r.get("p99.9_ms")),
    ("mbs", "MB/s", lambda r: r.get("mb_per_s")),
    ("err", "errors", lambda r: r.get("errors")),
    ("cpu", "agents CPU s", lambda r: r.get("agent_cpu_s")),
    ("rss", "agent RSS MiB n1/n2", lambda r: r.get("agent_rss_mib")),
)


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    heads = [h for _, h, _ in COLUMNS]
    body = [[_fmt(get(r)) for _, _, get in COLUMNS] for r in rows]
    return heads, body


def rows_table(rows: list[dict[str, Any]]) -> str:
    """The measurement rows as an aligned text grid (the terminal table)."""
    heads, body = _cells(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _md_table(heads: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return out


def chart_panels(doc: dict[str, Any]) -> list[Panel]:
    """One panel per (latency scenario, fixed rate): p50/p90/p99 per set-up, or the mean where
    the load generator reports no percentiles (h2load); groups nobody measured are left out
    (a restart row has its p99 only), and so are panels with nothing to draw."""
    rows = doc.get("rows") or []
    keys: list[tuple[str, str]] = []
    for r in rows:
        k = (r["scenario"], r["load"])
        if r["load"] not in ("max", "-") and k not in keys:
            keys.append(k)
    panels = []
    for scenario, load in keys:
        by_setup = {r["setup"]: r for r in rows if (r["scenario"], r["load"]) == (scenario, load)}
        groups: dict[str, list[float | None]] = {}
        for q in ("p50", "p90", "p99"):
            values = [by_setup.get(s, {}).get(f"{q}_ms") for s in SETUPS]
            if any(v is not None for v in values):
                groups[q] = values
        if not groups:
            means = [by_setup.get(s, {}).get("mean_ms") for s in SETUPS]
            if any(v is not None for v in means):
                groups["mean"] = means
        if groups:
            panels.append(Panel(f"{scenario} {load}", tuple(groups), SETUPS, list(groups.values())))
    return panels


def cpu_section(doc: dict[str, Any]) -> list[str]:
    """CPU per 1,000 requests per fixed-rate load: the mesh (both agents, and per agent beside
    Istio's published vCPU per 1,000 req/s), HAProxy (both processes), their ratio; with the CPU
    model, since these figures move with the machine more than any other."""
    figures = {f["metric"]: float(f["value"]) for f in doc.get("figures") or []}
    cpu = ((doc.get("meta") or {}).get("machine") or {}).get("cpu", "?")
    body = []
    for r in doc.get("rows") or []:
        scenario, load = r["scenario"], r["load"]
        if r["setup"] != "mesh" or load in ("max", "-"):
            continue
        key = f"{scenario} {load}"
        mesh = figures.get(f"{key} mesh CPU per 1000 req")
        if mesh is None:
            continue
        reference = {"l4": "ztunnel 0.06", "http": "waypoint 0.25"}.get(scenario, "-")
        body.append(
            [
                key,
                _fmt(mesh),
                _fmt(figures.get(f"{key} CPU per 1000 req per agent")),
                _fmt(figures.get(f"{key} haproxy CPU per 1000 req")),
                _fmt(figures.get(f"{key} CPU per 1000 req mesh/haproxy")),
                reference,
            ]
        )
    if not body:
        return []
    heads = ["load", "mesh (2 agents)", "per agent", "haproxy (2)", "mesh/haproxy", "published"]
    return [
        "",
        "## CPU per 1,000 requests (s, i.e. vCPU at 1,000 req/s)",
        "",
        f"On {cpu}; process CPU from /proc around each run, warm-up included in the count.",
        "",
        *_md_table(heads, body),
    ]


def l7_section(doc: dict[str, Any]) -> list[str]:
    """HTTP with both agents parsing (`http`) vs both relaying at L4 (`http-l4`, the same server
    behind a `tcp-` port), per load: the added latency and each agent's CPU per 1,000 requests;
    the server's agent's (n2) difference is what the destination's L7 costs."""
    figures = {f["metric"]: float(f["value"]) for f in doc.get("figures") or []}
    loads = [r["load"] for r in doc.get("rows") or [] if r["scenario"] == "http-l4"]
    body = []
    for load in loads:
        row = [load]
        row += [_fmt(figures.get(f"http L7 on-off {load} {q}")) for q in ("p50", "p90", "p99")]
        for side in ("destination", "source"):
            key = f"http {load} {side} agent CPU per 1000 req L7"
            row += [_fmt(figures.get(f"{key} off")), _fmt(figures.get(f"{key} on"))]
            row.append(_fmt(figures.get(f"{key} added")))
        body.append(row)
    if not body:
        return []
    heads = ["load", "p50 added ms", "p90 added ms", "p99 added ms",
             "dest CPU off", "dest CPU on", "dest added", "src CPU off", "src CPU on",
             "src added"]  # fmt: skip
    off_max = figures.get("http L7 off max rate")
    if (doc.get("parameters") or {}).get("destination_l7") == "when-needed":
        destination = (
            "the destination relays it at L4, `--destination-l7 when-needed` with no policy "
            "reading requests"
        )
    else:
        destination = "the destination parses, authenticates, authorizes and records every request"
    return [
        "",
        "## Destination L7: on vs off",
        "",
        f"`http` (port named `http`: the source routes, {destination}) minus `http-l4` (the same",
        "server and load on a port named `tcp-web`: both agents relay at L4). CPU: s per 1,000",
        "requests per agent, n2 (destination) and n1 (source), raw process CPU (idle not",
        "subtracted)." + (f" Max rate with L7 off: {off_max:,.0f} req/s." if off_max else ""),
        "",
        *_md_table(heads, body),
    ]


def render_markdown(
    doc: dict[str, Any], png_name: str | None = PNG_NAME, workers: dict[str, Any] | None = None
) -> str:
    meta = doc.get("meta") or {}
    m = meta.get("machine") or {}
    figures = {f["metric"]: f for f in doc.get("figures") or []}
    lines = [
        "# Benchmarks: direct vs this mesh vs HAProxy",
        "",
        "<!-- Generated by `scripts/bench report` from docs/benchmarks.json: do not edit. -->",
        "",
        "How it is measured (`nodeagent/bench/mesh.py`): a 2-node sandbox, a server pod on n2 and",
        "a client pod on n1; three set-ups measured back to back for every scenario and load, so",
        "they share the machine's load: **direct** (pods opted out with",
        "`istio.io/dataplane-mode=none`, pod to pod), **mesh** (meshed pods, client → Service VIP",
        "through both agents, whatever data plane the agents run), **haproxy** (HAProxy in n1's",
        "netns → mutual TLS → HAProxy in n2's netns → server, one thread each). Fixed rates use an",
        "open-loop generator that measures every latency from the request's *intended* send time",
        "(coordinated-omission correction, as wrk2); max rates are closed-loop (wrk for HTTP).",
        "Agent CPU and RSS come from `/proc/<agent pid>` of both agents around each run.",
        "",
        "## The run",
        "",
        f"- command: `{meta.get('command', '?')}`",
        f"- when: {meta.get('started', '?')}, {meta.get('wall_s', '?')} s in all",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, Linux "
        f"{m.get('kernel', '?')}, Python {m.get('python', '?')}; {m.get('haproxy', '')}",
        "- parameters: " + ", ".join(f"{k}={v}" for k, v in (doc.get("parameters") or {}).items()),
    ]
    lines += [f"- note: {n}" for n in doc.get("notes") or []]
    if png_name:
        lines += ["", f"![latency percentiles per set-up]({png_name})"]
    figures = derived_figures(figures)
    lines += targets_section("Targets (issue 14: data plane v2)", TARGETS_V2, figures)
    lines += targets_section("Targets (issue 8: the first data plane)", TARGETS, figures)
    lines += cpu_section(doc)
    lines += l7_section(doc)
    lines += [
        "",
        "Where the agents' CPU goes (py-spy profiles: `scripts/bench mesh --profile DIR`), what",
        "was changed for it, and what it would take to meet the targets still missed: the",
        "Performance sections of [dataplane.md](dataplane.md#performance) (L4, mTLS, bulk) and",
        "[l7.md](l7.md#performance) (the HTTP proxy).",
    ]
    if workers:
        lines += workers_section(workers)
    lines += ["", "## Every measurement", ""]
    heads, body = _cells(doc.get("rows") or [])
    lines += _md_table(heads, body)
    lines += ["", "## Figures", ""]
    lines += _md_table(
        ["figure", "value", "unit"],
        [[f["metric"], _fmt(float(f["value"])), f["unit"]] for f in doc.get("figures") or []],
    )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    source = Path(args.source)
    try:
        doc = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"scripts/bench report: cannot read {source}: {exc}", file=sys.stderr)
        return 1
    if isinstance(doc, list):  # `-o json` output: pick the mesh result
        doc = next((d for d in doc if d.get("bench") == "mesh"), None)
    if not isinstance(doc, dict) or doc.get("bench") != "mesh":
        print(f"scripts/bench report: {source} holds no mesh run", file=sys.stderr)
        return 1
    workers_path = source.with_name(WORKERS_JSON)
    runs = getattr(args, "workers_runs", None) or []
    if runs:
        try:
            condensed = [condense(json.loads(Path(f).read_text()), Path(f).name) for f in runs]
        except (OSError, json.JSONDecodeError, ValueError, KeyError) as exc:
            print(f"scripts/bench report: --workers-runs: {exc}", file=sys.stderr)
            return 1
        workers_path.write_text(json.dumps(summarize(condensed), indent=2) + "\n")
    workers = json.loads(workers_path.read_text()) if workers_path.exists() else None
    md = Path(args.md)
    md.parent.mkdir(parents=True, exist_ok=True)
    panels = chart_panels(doc)
    png_name = None
    if panels:
        png_name = PNG_NAME
        (md.parent / PNG_NAME).write_bytes(bar_chart(panels))
    md.write_text(render_markdown(doc, png_name, workers))
    print(f"wrote {md}" + (f" and {md.parent / PNG_NAME}" if png_name else ""))
    return 0
