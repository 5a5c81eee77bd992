"""The demo's command line: bring the sandbox up, run every step (a failing step is reported and
the others still run, unless the pods could not be deployed), print the summary, and tear the
sandbox down on every way out. The first Ctrl-C (or SIGTERM) stops the story and cleans up;
further ones are ignored until the cleanup is done, so it cannot be cut short."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from nodeagent.demo import output as out
from nodeagent.demo.steps import SEED, STEPS, Demo, StepFailed
from nodeagent.sandbox import Sandbox, SandboxError

DEFAULT_NAME = "demo"


class Interrupted(BaseException):
    """Raised from the signal handler; a BaseException so that no step swallows it."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # Once: later signals are ignored so the teardown runs to its end (it is bounded).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    p.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help="sandbox name: 1-20 of [a-z0-9], no '-' (default: demo)",
    )
    p.add_argument("--keep-logs", type=Path, help="copy the agents' and pods' logs here at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    started = time.monotonic()
    results: list[tuple[str, str]] = []
    sb: Sandbox | None = None
    work = Path(tempfile.mkdtemp(prefix="nodeagent-demo-"))
    try:
        if not SEED.is_dir():
            print(
                f"demo: the article's examples are missing at {SEED} (the corpus is expected "
                "beside the checkout, in ../shared/corpus/seed)",
                file=sys.stderr,
            )
            return 1
        total = len(STEPS) + 1
        out.heading(1, total, "A 2-node sandbox with the embedded store and an ingress gateway")
        out.explain(
            "Each node is a network namespace on an underlay bridge with one node agent; the "
            "store is an embedded SQLite file; n1's agent also runs the ingress gateway. The "
            "outside host (10.200.0.100) reaches only the gateway, never a pod."
        )
        if Sandbox(args.name, progress=False).exists():
            out.progress(f"a sandbox {args.name!r} is left over from an earlier run: removing it")
            Sandbox(args.name, progress=False).down()
        try:
            sb = Sandbox.up(args.name, nodes=2, store="sqlite", gateway="n1", progress=True)
        except SandboxError as e:
            print(f"\ndemo FAILED: the sandbox did not come up: {e}", file=sys.stderr)
            return 1
        out.evidence(
            f"store {sb.store_url}", f"gateway {sb.gateway_url()} (as the outside host sees it)"
        )
        demo = Demo(sb=sb, work=work)
        for i, (title, text, step) in enumerate(STEPS, start=2):
            out.heading(i, total, title)
            out.explain(text)
            t0 = time.monotonic()
            try:
                step(demo)
            except (StepFailed, SandboxError) as e:
                print(f"  ✗ FAILED: {e}", flush=True)
                results.append((title, str(e).splitlines()[0] if str(e) else type(e).__name__))
                if step is STEPS[0][2]:
                    break  # nothing else can run without the pods
                continue
            print(f"  ✓ ok ({time.monotonic() - t0:.1f}s)", flush=True)
            results.append((title, "ok"))
    except Interrupted as e:
        print(f"\ndemo interrupted ({e}): cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _teardown(sb, work, args.keep_logs)
    failed = [r for r in results if r[1] != "ok"]
    print(f"\nSummary ({time.monotonic() - started:.0f}s, sandbox removed):")
    for title, status in results:
        print(
            f"  {'✓' if status == 'ok' else '✗'} {title}{'' if status == 'ok' else ': ' + status}"
        )
    if failed or len(results) < len(STEPS):
        print(f"\ndemo FAILED: {len(failed)} step(s) did not behave", file=sys.stderr)
        return 1
    print("\ndemo OK")
    return 0


def _teardown(sb: Sandbox | None, work: Path, keep_logs: Path | None) -> None:
    if sb is not None:
        try:
            sb.down(keep_logs=keep_logs)
        except SandboxError as e:
            print(f"demo: teardown: {e}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
