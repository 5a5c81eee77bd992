"""`python -m nodeagent.bench [-o table|json] [NAME [options]]`: run one benchmark, or all."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from types import ModuleType

from nodeagent.bench import Result
from nodeagent.bench import enroll as enroll_bench
from nodeagent.bench import snapshot as snapshot_bench

BENCHES: dict[str, ModuleType] = {
    snapshot_bench.NAME: snapshot_bench,
    enroll_bench.NAME: enroll_bench,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    subs = parser.add_subparsers(dest="bench", metavar="NAME")
    for name, module in BENCHES.items():
        module.add_arguments(subs.add_parser(name, help=module.HELP))
    return parser


def _table(result: Result) -> str:
    params = " ".join(f"{k}={v}" for k, v in result.parameters.items())
    lines = [f"== {result.bench}  {params}".rstrip()]
    width = max((len(f.metric) for f in result.figures), default=10)
    for f in result.figures:
        value = f"{f.value:,.0f}" if abs(f.value) >= 100 else f"{f.value:,.3f}"
        lines.append(f"  {f.metric:<{width}}  {value:>14} {f.unit}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    names = [args.bench] if args.bench else list(BENCHES)
    results = []
    for name in names:
        # Without a NAME, each bench runs with its own defaults.
        bench_args = args if args.bench else parser.parse_args([name])
        result = BENCHES[name].run(bench_args)
        results.append(result)
        if args.output == "table":
            print(_table(result), flush=True)
    if args.output == "json":
        doc = [
            {
                "bench": r.bench,
                "parameters": r.parameters,
                "figures": [
                    {"metric": f.metric, "value": f.value, "unit": f.unit} for f in r.figures
                ],
            }
            for r in results
        ]
        json.dump(doc, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
