"""The progressive-delivery status records, read for the rollouts panel.

The status of rollout <ns>/<name> is a msgpack map at `/mesh/v1/rollouts/<ns>/<name>` (issue
18's contract): phase, host, stable, canary, weight, failedChecks, iteration, lastAnalysis
(metric → float|None), events [{time, message}], history [{time, weight, analysis}], updated.
A record that does not decode or has the wrong shape is shown as an error row, never dropped
silently and never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nodeagent.store import KeyValue
from nodeagent.store.codec import DecodeError, decode
from nodeagent.store.keys import ROOT

PREFIX = ROOT + "rollouts/"
PHASES = frozenset({"Initializing", "Progressing", "Promoting", "Succeeded", "Failed", "Paused"})
MAX_ROWS = 200  # events and history entries shown per rollout (the newest)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def rollout_doc(kv: KeyValue) -> dict[str, Any]:
    ref = kv.key.removeprefix(PREFIX)
    try:
        raw = decode(kv)
    except DecodeError as exc:
        return {"ref": ref, "error": str(exc)}
    if not isinstance(raw, dict):
        return {"ref": ref, "error": f"{kv.key}: a {type(raw).__name__}, not a map"}
    phase = raw.get("phase")
    last = raw.get("lastAnalysis")
    analysis: dict[Any, Any] = last if isinstance(last, dict) else {}
    events = [e for e in raw.get("events") or () if isinstance(e, dict)][-MAX_ROWS:]
    history = [h for h in raw.get("history") or () if isinstance(h, dict)][-MAX_ROWS:]
    return {
        "ref": ref,
        "phase": phase if phase in PHASES else f"unknown ({phase!r})",
        "host": str(raw.get("host", "")),
        "stable": str(raw.get("stable", "")),
        "canary": str(raw.get("canary", "")),
        "weight": _number(raw.get("weight")),
        "failed_checks": _number(raw.get("failedChecks")),
        "iteration": _number(raw.get("iteration")),
        "analysis": {str(k): _number(v) for k, v in sorted(analysis.items())},
        "events": [
            {"time": _number(e.get("time")), "message": str(e.get("message", ""))} for e in events
        ],
        "history": [
            {
                "time": _number(h.get("time")),
                "weight": _number(h.get("weight")),
                "analysis": {
                    str(k): _number(v) for k, v in sorted((h.get("analysis") or {}).items())
                }
                if isinstance(h.get("analysis"), dict)
                else {},
            }
            for h in history
        ],
        "updated": _number(raw.get("updated")),
    }


def read_rollouts(kvs: Iterable[KeyValue]) -> list[dict[str, Any]]:
    """The rollouts panel's rows from the records under `PREFIX`, by namespace/name."""
    return sorted(
        (rollout_doc(kv) for kv in kvs if kv.key.startswith(PREFIX)), key=lambda d: d["ref"]
    )
