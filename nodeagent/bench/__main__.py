"""`python -m nodeagent.bench [-o table|json] [NAME [options]]`: run one benchmark, or all.

`python -m nodeagent.bench report [--from FILE]` renders the last saved `mesh` run (its JSON,
docs/benchmarks.json by default) into docs/benchmarks.md and its PNG chart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from types import ModuleType

from nodeagent.bench import Result
from nodeagent.bench import enroll as enroll_bench
from nodeagent.bench import fanout as fanout_bench
from nodeagent.bench import gateway as gateway_bench
from nodeagent.bench import mesh as mesh_bench
from nodeagent.bench import report as report_cmd
from nodeagent.bench import snapshot as snapshot_bench

BENCHES: dict[str, ModuleType] = {
    snapshot_bench.NAME: snapshot_bench,
    enroll_bench.NAME: enroll_bench,
    fanout_bench.NAME: fanout_bench,
    mesh_bench.NAME: mesh_bench,
    gateway_bench.NAME: gateway_bench,
}
# Another engineer's micro-benchmark, registered when it is there.
if importlib.util.find_spec("nodeagent.bench.balance") is not None:
    from nodeagent.bench import balance as balance_bench  # type: ignore[attr-defined,unused-ignore]

    BENCHES[balance_bench.NAME] = balance_bench


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    subs = parser.add_subparsers(dest="bench", metavar="NAME")
    for name, module in BENCHES.items():
        module.add_arguments(subs.add_parser(name, help=module.HELP))
    report_cmd.add_arguments(subs.add_parser(report_cmd.NAME, help=report_cmd.HELP))
    return parser


def _value(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3f}"


def _grid(rows: list[dict[str, object]]) -> str:
    """Free-form rows (one dict per row, the first row's keys as columns) as a text grid."""
    heads = list(rows[0])
    body = [
        [_value(v) if isinstance(v, float) else str(r.get(h, "")) for h, v in _cells(r, heads)]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    out = [
        "  "
        + "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(heads, widths, strict=True))
        )
    ]
    for b in body:
        out.append(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(b, widths, strict=True))
            )
        )
    return "\n".join(out)


def _cells(row: dict[str, object], heads: list[str]) -> list[tuple[str, object]]:
    return [(h, row.get(h, "")) for h in heads]


def _table(result: Result) -> str:
    params = " ".join(f"{k}={v}" for k, v in result.parameters.items())
    lines = [f"== {result.bench}  {params}".rstrip()]
    if result.rows and "scenario" in result.rows[0]:
        lines.append(report_cmd.rows_table(result.rows))
    elif result.rows:
        lines.append(_grid(result.rows))
    # Figures the rows already show (a side-by-side table) are not printed twice.
    in_rows = {r.get("metric") for r in result.rows}
    figures = [f for f in result.figures if f.metric not in in_rows]
    width = max((len(f.metric) for f in figures), default=10)
    for f in figures:
        lines.append(f"  {f.metric:<{width}}  {_value(f.value):>14} {f.unit}")
    lines.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.bench == report_cmd.NAME:
        return report_cmd.run(args)
    names = [args.bench] if args.bench else list(BENCHES)
    results = []
    for name in names:
        # Without a NAME, each bench runs with its own defaults.
        bench_args = args if args.bench else parser.parse_args([name])
        bench_args.argv = argv if args.bench else [name]
        result = BENCHES[name].run(bench_args)
        results.append(result)
        if args.output == "table":
            print(_table(result), flush=True)
    if args.output == "json":
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
