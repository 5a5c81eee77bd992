"""The rollouts panel: rows built from the status records through their one reader,
`nodeagent.rollout.status` (the record's contract lives there, docs/rollouts.md).

A record that does not decode or has the wrong shape is shown as an error row naming the
problem, never dropped silently and never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nodeagent.rollout.status import ROLLOUTS as PREFIX
from nodeagent.rollout.status import Status, StatusError, from_kv
from nodeagent.store import KeyValue

__all__ = ["MAX_ROWS", "PREFIX", "read_rollouts", "rollout_doc"]

MAX_ROWS = 200  # events and history entries shown per rollout (the newest)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _analysis(value: Any) -> dict[str, float | None]:
    return {str(k): _number(v) for k, v in sorted(value.items())} if isinstance(value, dict) else {}


def _row(status: Status) -> dict[str, Any]:
    return {
        "ref": status.ref,
        "phase": status.phase,
        "host": status.host,
        "stable": status.stable,
        "canary": status.canary,
        "weight": status.weight,
        "failed_checks": status.failed_checks,
        "iteration": status.iteration,
        "analysis": _analysis(status.last_analysis),
        "events": [
            {"time": _number(e.get("time")), "message": str(e.get("message", ""))}
            for e in status.events[-MAX_ROWS:]
        ],
        "history": [
            {
                "time": _number(h.get("time")),
                "weight": _number(h.get("weight")),
                "analysis": _analysis(h.get("analysis")),
            }
            for h in status.history[-MAX_ROWS:]
        ],
        "updated": status.updated,
    }


def rollout_doc(kv: KeyValue) -> dict[str, Any]:
    try:
        return _row(from_kv(kv))
    except StatusError as exc:
        return {"ref": kv.key.removeprefix(PREFIX), "error": str(exc)}


def read_rollouts(kvs: Iterable[KeyValue]) -> list[dict[str, Any]]:
    """The rollouts panel's rows from the records under `PREFIX`, by namespace/name."""
    return sorted(
        (rollout_doc(kv) for kv in kvs if kv.key.startswith(PREFIX)), key=lambda d: d["ref"]
    )
