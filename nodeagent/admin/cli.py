"""`nodeagent admin …`: talk to a running agent over its admin socket.

Readable tables by default, the server's JSON with `-o json`. A missing socket or a refused
connection is one clear line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nodeagent.admin.client import AdminClientError, admin_call_sync
from nodeagent.contract import ADMIN_SOCKET, METRICS_PATH
from nodeagent.telemetry import exposition


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [
        [str(c) for c in header],
        *[["-" if c in (None, "") else str(c) for c in r] for r in rows],
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return (
        "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
        )
        + "\n"
    )


def _get(item: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if n in item and item[n] not in (None, ""):
            return item[n]
    return None


def workloads_table(items: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for w in items:
        addresses = _get(w, "addresses") or []
        rows.append(
            [
                _get(w, "namespace"),
                _get(w, "name"),
                ",".join(addresses) if isinstance(addresses, list) else addresses,
                _get(w, "service_account", "serviceAccount"),
                _get(w, "state"),
                _get(w, "uid"),
            ]
        )
    return table(rows, ["NAMESPACE", "NAME", "ADDRESSES", "SERVICE ACCOUNT", "STATE", "UID"])


def workers_table(value: Mapping[str, Any]) -> str:
    """`/workers`: one row per data-plane process (none when the agent serves in-process)."""
    rows = [
        [
            _get(w, "slot"),
            _get(w, "pid"),
            "yes" if w.get("up") else "no",
            _get(w, "incarnation"),
            w.get("restarts", 0),
            w.get("pods", 0),
            w.get("connections", 0),
            _get(w, "snapshot_revision"),
        ]
        for w in value.get("processes") or []
    ]
    head = f"workers: {value.get('workers')}"
    if not rows:
        return head + " (the pods are served in the agent's own process)\n"
    header = ["SLOT", "PID", "UP", "INCARNATION", "RESTARTS", "PODS", "CONNECTIONS", "REVISION"]
    return head + "\n" + table(rows, header)


def _expires_in(cert: Mapping[str, Any], now: float) -> Any:
    given = _get(cert, "expires_in_seconds")
    if given is not None:
        return given
    not_after = _get(cert, "not_after", "expiry")
    try:
        return int(datetime.fromisoformat(str(not_after)).timestamp() - now)
    except ValueError:
        return None


def certs_table(items: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [
        [
            _get(c, "identity"),
            _get(c, "serial"),
            _get(c, "not_after", "expiry"),
            _expires_in(c, now),
            _get(c, "state"),
        ]
        for c in items
    ]
    return table(rows, ["IDENTITY", "SERIAL", "NOT AFTER", "EXPIRES IN (S)", "STATE"])


def stats_table(text: str) -> str:
    rows = []
    for fam in exposition.parse(text).values():
        for s in fam.samples:
            if s.name.endswith("_bucket") and fam.kind == "histogram":
                continue  # the table shows _sum/_count; buckets are for Prometheus
            labels = ",".join(
                f"{k}={v}" for k, v in s.labels.items() if v not in ("unknown", "-", "")
            )
            rows.append([s.name, labels, exposition_value(s.value)])
    return table(rows, ["METRIC", "LABELS", "VALUE"])


def exposition_value(v: float) -> str:
    return str(int(v)) if v.is_integer() else f"{v:.3f}"


def config_dump_text(dump: Mapping[str, Any]) -> str:
    out = []
    scalars = [[k, v] for k, v in sorted(dump.items()) if not isinstance(v, dict | list)]
    if scalars:
        out.append(table(scalars, ["FIELD", "VALUE"]))
    for key, value in sorted(dump.items()):
        if isinstance(value, dict):
            out.append(f"{key}:\n" + table(sorted(value.items()), ["KEY", "VALUE"]))
    out.append("workloads:\n" + workloads_table(dump.get("workloads") or dump.get("pods") or []))
    out.append("certs:\n" + certs_table(dump.get("certificates") or []))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nodeagent admin", description="Query a running agent over its admin socket."
    )
    p.add_argument("--socket", type=Path, default=ADMIN_SOCKET, help="admin socket path")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("config-dump", help="snapshot, pods, certificates")
    sub.add_parser("workloads", help="pods enrolled on this node")
    sub.add_parser("certs", help="workload certificates (serial, expiry)")
    sub.add_parser("stats", help="metrics")
    sub.add_parser("workers", help="the data-plane worker processes (--workers)")
    lv = sub.add_parser("log-level", help="show or change the agent's log level")
    lv.add_argument("level", nargs="?", choices=["debug", "info", "warning", "error"])
    dr = sub.add_parser("drain", help="drain connections, then exit the agent")
    dr.add_argument("--deadline", type=float, default=5.0, help="seconds (default 5)")
    # Options are accepted after the subcommand too: `nodeagent admin certs -o json`.
    for sp in sub.choices.values():
        sp.add_argument("--socket", type=Path, default=argparse.SUPPRESS)
        sp.add_argument("-o", "--output", choices=["table", "json"], default=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        print(_run(args), end="")
    except AdminClientError as exc:
        print(f"nodeagent admin: {exc}", file=sys.stderr)
        return 1
    except (ValueError, exposition.ExpositionError) as exc:
        print(f"nodeagent admin: bad answer from the agent: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> str:
    sock: Path = args.socket
    as_json = args.output == "json"
    cmd = args.command
    if cmd == "stats":
        text = admin_call_sync(sock, "GET", METRICS_PATH).decode()
        if as_json:
            fams = exposition.parse(text)
            return _dumps(
                [
                    {"name": s.name, "labels": s.labels, "value": s.value}
                    for f in fams.values()
                    for s in f.samples
                ]
            )
        return stats_table(text)
    if cmd == "log-level":
        if args.level is None:
            value = json.loads(admin_call_sync(sock, "GET", "/logging"))
        else:
            value = json.loads(admin_call_sync(sock, "POST", f"/logging?level={quote(args.level)}"))
        if as_json:
            return _dumps(value)
        if "previous" in value:
            return f"log level: {value['previous']} -> {value['level']}\n"
        return f"log level: {value['level']}\n"
    if cmd == "drain":
        value = json.loads(
            admin_call_sync(sock, "POST", f"/quitquitquit?deadline={args.deadline:g}")
        )
        if as_json:
            return _dumps(value)
        return f"draining: the agent exits within {value['deadline_seconds']:g} s\n"
    path = {
        "config-dump": "/config_dump",
        "workloads": "/workloads",
        "certs": "/certs",
        "workers": "/workers",
    }[cmd]
    value = json.loads(admin_call_sync(sock, "GET", path))
    if as_json:
        return _dumps(value)
    if cmd == "workloads":
        return workloads_table(value)
    if cmd == "certs":
        return certs_table(value)
    if cmd == "workers":
        return workers_table(value)
    return config_dump_text(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
