"""`meshctl rollout status|get|pause|resume|promote|abort NAME` and `meshctl ab report HOST`.

The status and the measured windows come from the store (`nodeagent.rollout.status`,
`nodeagent.rollout.windows`); manual actions are moves of the same algorithm the controller
runs (`nodeagent.rollout.analysis`), committed the same way (one transaction with the route
change, compared against what was read; a conflict with the controller is retried).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any, TextIO

import trio

from nodeagent.config.duration import DurationError, seconds
from nodeagent.config.validate.common import fqdn
from nodeagent.rollout import analysis
from nodeagent.rollout.commit import Loaded, RolloutNotFound, commit, load, rollout_prefix
from nodeagent.rollout.metrics import Figures
from nodeagent.rollout.model import Rollout, compile_rollout
from nodeagent.rollout.routes import RouteError
from nodeagent.rollout.significance import TEST_NAME, two_proportion
from nodeagent.rollout.status import TERMINAL, Status, read_status
from nodeagent.rollout.windows import Windows, list_windows, read_windows
from nodeagent.store import DEFAULT_URL, ENV_VAR, Store, StoreError, open_store
from nodeagent.store.codec import decode

ACTIONS = ("status", "get", "pause", "resume", "promote", "abort")
WATCH_PERIOD = 0.5
COMMIT_ATTEMPTS = 5


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    ro = sub.add_parser("rollout", parents=[common], help="watch and steer a Rollout")
    ro.add_argument("action", choices=ACTIONS)
    ro.add_argument("name", metavar="NAME")
    ro.add_argument("-w", "--watch", action="store_true", help="follow until it ends (status)")
    ro.add_argument("-o", "--output", choices=["table", "json"], default="table")
    ab = sub.add_parser("ab", parents=[common], help="A/B experiment results")
    ab.add_argument("what", choices=["report"])
    ab.add_argument("host", metavar="HOST")
    ab.add_argument("--since", default="10m", help="window to report (default 10m)")
    ab.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _store_url(args: argparse.Namespace) -> str:
    return str(getattr(args, "store", None) or os.environ.get(ENV_VAR) or DEFAULT_URL)


def _namespace(args: argparse.Namespace) -> str:
    return str(getattr(args, "namespace", None) or "default")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def _latest(windows: Windows) -> dict[str, Figures]:
    return windows.windows[-1].subsets if windows.windows else {}


def status_lines(status: Status, latest: dict[str, Figures]) -> list[str]:
    lines = [
        f"rollout {status.ref}  host {status.host}  phase {status.phase}",
        f"  weight {status.weight}% to {status.canary} ({status.stable} {100 - status.weight}%)"
        f"  iteration {status.iteration}  failed checks {status.failed_checks}",
    ]
    for subset in (status.stable, status.canary):
        fig = latest.get(subset)
        if fig is not None:
            lines.append(
                f"  {subset:<12} requests {fig.requests:>6.0f}  success {_pct(fig.success_rate)}"
                f"  p99 {_ms(fig.quantile(0.99))}  (last interval)"
            )
    if status.events:
        lines.append(f"  last event: {status.events[-1]['message']}")
    return lines


def _status_json(status: Status, latest: dict[str, Figures]) -> dict[str, Any]:
    record = status.to_record()
    record["name"], record["namespace"] = status.name, status.namespace
    record["subsets"] = {k: _figures_json(v) for k, v in latest.items()}
    return record


def _figures_json(fig: Figures) -> dict[str, Any]:
    return {
        "requests": int(fig.requests),
        "successRate": fig.success_rate,
        "p50": fig.quantile(0.5),
        "p90": fig.quantile(0.9),
        "p99": fig.quantile(0.99),
    }


async def _status(store: Store, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    ns, name = _namespace(args), args.name
    shown = None
    while True:
        status = await read_status(store, ns, name)
        if status is None:
            if await store.get(f"{rollout_prefix()}{ns}/{name}") is None:
                print(f"error: rollout {ns}/{name} not found", file=err)
                return 1
            if not args.watch:
                print(f"rollout {ns}/{name}: not started by a controller yet", file=out)
                return 0
        else:
            windows = await read_windows(store, ns, name, status.host)
            latest = _latest(windows)
            if args.output == "json":
                text = json.dumps(_status_json(status, latest), sort_keys=True)
            elif args.action == "get":
                text = json.dumps(_status_json(status, latest), indent=2, sort_keys=True)
            else:
                text = "\n".join(status_lines(status, latest))
            if text != shown:
                print(text, file=out, flush=True)
                shown = text
            if not args.watch or status.phase in TERMINAL:
                return 0
        await trio.sleep(WATCH_PERIOD)


def _action(name: str) -> Callable[[Loaded, float], analysis.Move | str]:
    def pause(loaded: Loaded, now: float) -> analysis.Move | str:
        s = loaded.status
        assert s is not None
        if s.phase == "Paused":
            return "is already paused"
        return analysis.Move(analysis.pause(s, now))

    def resume(loaded: Loaded, now: float) -> analysis.Move | str:
        s = loaded.status
        assert s is not None
        if s.phase != "Paused":
            return f"is not paused (phase {s.phase})"
        return analysis.Move(analysis.resume(s, now))

    def promote(loaded: Loaded, now: float) -> analysis.Move | str:
        assert loaded.status is not None
        return analysis.promote(loaded.rollout, loaded.status, now, " by hand")

    def abort(loaded: Loaded, now: float) -> analysis.Move | str:
        assert loaded.status is not None
        return analysis.abort(loaded.rollout, loaded.status, now, "aborted by hand")

    return {"pause": pause, "resume": resume, "promote": promote, "abort": abort}[name]


async def _steer(store: Store, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    ns, name = _namespace(args), args.name
    decide = _action(args.action)
    for _ in range(COMMIT_ATTEMPTS):
        try:
            loaded = await load(store, ns, name)
        except RolloutNotFound as exc:
            print(f"error: {exc}", file=err)
            return 1
        if loaded.status is None:
            print(f"error: rollout {ns}/{name} has not started (no controller yet?)", file=err)
            return 1
        if loaded.status.phase in TERMINAL:
            print(f"error: rollout {ns}/{name} already ended ({loaded.status.phase})", file=err)
            return 1
        move = decide(loaded, time.time())
        if isinstance(move, str):
            print(f"error: rollout {ns}/{name} {move}", file=err)
            return 1
        try:
            if await commit(store, loaded, move):
                print(f"rollout {ns}/{name}: {move.status.phase}: {move.status.reason}", file=out)
                return 0
        except RouteError as exc:
            print(f"error: rollout {ns}/{name}: {exc}; nothing was changed", file=err)
            return 1
    print(f"error: rollout {ns}/{name} kept changing; nothing was changed, try again", file=err)
    return 1


async def run_rollout(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = _store_url(args)
    try:
        store = await open_store(url)
    except StoreError as exc:
        print(f"error: store {url}: {exc}", file=err)
        return 1
    try:
        if args.action in ("status", "get"):
            return await _status(store, args, out, err)
        return await _steer(store, args, out, err)
    except StoreError as exc:
        print(f"error: store {url}: {exc}", file=err)
        return 1
    finally:
        await store.aclose()


# ----- meshctl ab report ----------------------------------------------------------------------


async def ab_report(
    store: Store, host: str, namespace: str, since: float, now: float
) -> dict[str, Any]:
    """Per subset (and A/B branch) of every rollout of `host`: figures over the last `since`."""
    want = fqdn(host, namespace)
    kvs, _ = await store.range(rollout_prefix())
    rollouts: dict[str, Rollout] = {}
    for kv in kvs:
        try:
            compiled = compile_rollout(decode(kv))
        except (KeyError, ValueError):
            continue
        if compiled.fqdn == want:
            rollouts[compiled.ref] = compiled
    variants: dict[str, Figures] = {}
    branches: dict[str, str] = {}
    order: list[str] = []
    for windows in await list_windows(store):
        ref = f"{windows.namespace}/{windows.name}"
        r = rollouts.get(ref)
        if r is None:
            continue
        for subset, fig in windows.since(now - since).items():
            variants.setdefault(subset, Figures()).add(fig)
        for subset in (r.stable, r.canary):
            if subset not in order:
                order.append(subset)
            if r.is_ab:
                branches[subset] = "match" if subset == r.canary else "default"
            else:
                branches.setdefault(subset, "weight")
    rows = []
    for subset in order:
        fig = variants.get(subset, Figures())
        rows.append({"subset": subset, "branch": branches.get(subset, ""), **_figures_json(fig)})
    comparison: dict[str, Any] | None = None
    if len(order) >= 2:
        a, b = variants.get(order[0], Figures()), variants.get(order[1], Figures())
        sig = two_proportion(
            a.requests - a.failures, a.requests, b.requests - b.failures, b.requests
        )
        comparison = {
            "baseline": order[0],
            "variant": order[1],
            "z": sig.z,
            "pValue": sig.p_value,
            "significant": sig.significant,
            "verdict": sig.reason,
        }
    return {
        "host": want,
        "since": since,
        "rollouts": sorted(rollouts),
        "test": TEST_NAME,
        "variants": rows,
        "comparison": comparison,
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    head = ["SUBSET", "BRANCH", "REQUESTS", "SUCCESS", "P50", "P90", "P99"]
    cells = [head]
    for v in report["variants"]:
        cells.append(
            [
                v["subset"],
                v["branch"] or "-",
                str(v["requests"]),
                _pct(v["successRate"]),
                _ms(v["p50"]),
                _ms(v["p90"]),
                _ms(v["p99"]),
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [f"host {report['host']}, last {report['since']:g}s ({', '.join(report['rollouts'])})"]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    c = report["comparison"]
    if c is not None:
        z = "-" if c["z"] is None else f"{c['z']:+.2f}"
        p = "-" if c["pValue"] is None else f"{c['pValue']:.3g}"
        lines.append(
            f"{c['variant']} vs {c['baseline']}: {c['verdict']} (z={z}, p={p}; {report['test']})"
        )
    return lines


async def run_ab(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        since = seconds(args.since)
    except DurationError as exc:
        print(f"error: --since: {exc}", file=err)
        return 2
    url = _store_url(args)
    try:
        store = await open_store(url)
        try:
            report = await ab_report(store, args.host, _namespace(args), since, time.time())
        finally:
            await store.aclose()
    except StoreError as exc:
        print(f"error: store {url}: {exc}", file=err)
        return 1
    if not report["rollouts"]:
        print(f"error: no Rollout of host {report['host']}", file=err)
        return 1
    if args.output == "json":
        print(json.dumps(report, sort_keys=True), file=out)
    else:
        print("\n".join(report_lines(report)), file=out)
    return 0
