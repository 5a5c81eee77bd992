"""The status record of a rollout: its one reader and writer (docs/store.md, docs/rollouts.md).

The status of rollout <ns>/<name> is a msgpack map at `/mesh/v1/rollouts/<ns>/<name>`, written
by the controller (and by `meshctl rollout pause|resume|promote|abort`) in the same store
transaction as the route change it records, compare-and-swapped on its mod revision, so two
writers never interleave. Its keys are a contract with other readers (the web console):

    version       1
    phase         Initializing | Progressing | Promoting | Succeeded | Failed | Paused
    host          the Rollout's host, stable, canary: subset names
    weight        int, the canary's percent now (0 in an A/B experiment: traffic is by match)
    failedChecks  int;  iteration: int (A/B iterations done, or canary steps taken)
    lastAnalysis  metric name → float or None (no data)
    events        [{time: unix seconds, message}], the last MAX_EVENTS
    history       [{time, weight, analysis}], one per step, the last MAX_HISTORY
    updated       unix seconds of the last write
    observed      the Rollout document's mod revision this run is for (a re-apply restarts it)
    resumePhase   the phase a Paused rollout resumes to
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from nodeagent.store import keys
from nodeagent.store.base import KeyValue, Put, Store
from nodeagent.store.codec import DecodeError, decode, encode

STATUS_VERSION = 1
ROLLOUTS = keys.ROOT + "rollouts/"
MAX_EVENTS = 100
MAX_HISTORY = 200

Phase = Literal["Initializing", "Progressing", "Promoting", "Succeeded", "Failed", "Paused"]
PHASES: tuple[Phase, ...] = (
    "Initializing",
    "Progressing",
    "Promoting",
    "Succeeded",
    "Failed",
    "Paused",
)
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})


class StatusError(ValueError):
    """A status record that is not what this module writes."""


def status_key(namespace: str, name: str) -> str:
    return f"{ROLLOUTS}{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class Status:
    namespace: str
    name: str
    phase: Phase
    host: str
    stable: str
    canary: str
    weight: int = 0
    failed_checks: int = 0
    iteration: int = 0
    last_analysis: dict[str, float | None] = field(default_factory=dict)
    events: tuple[dict[str, Any], ...] = ()
    history: tuple[dict[str, Any], ...] = ()
    updated: float = 0.0
    observed: int = 0
    resume_phase: str = ""
    mod_revision: int = 0  # of the record as read; 0: not in the store

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        return status_key(self.namespace, self.name)

    @property
    def step_started(self) -> float:
        """When the current step began: its history entry (the first is the run's start)."""
        return float(self.history[-1]["time"]) if self.history else self.updated

    def with_event(self, now: float, message: str) -> Status:
        events = (*self.events, {"time": now, "message": message})[-MAX_EVENTS:]
        return replace(self, events=events, updated=now)

    def with_step(self, now: float, analysis: dict[str, float | None]) -> Status:
        entry = {"time": now, "weight": self.weight, "analysis": dict(analysis)}
        return replace(self, history=(*self.history, entry)[-MAX_HISTORY:], updated=now)

    @property
    def reason(self) -> str:
        return str(self.events[-1]["message"]) if self.events else ""

    def to_record(self) -> dict[str, Any]:
        return {
            "version": STATUS_VERSION,
            "phase": self.phase,
            "host": self.host,
            "stable": self.stable,
            "canary": self.canary,
            "weight": self.weight,
            "failedChecks": self.failed_checks,
            "iteration": self.iteration,
            "lastAnalysis": dict(self.last_analysis),
            "events": [dict(e) for e in self.events],
            "history": [dict(h) for h in self.history],
            "updated": self.updated,
            "observed": self.observed,
            "resumePhase": self.resume_phase,
        }

    def put(self) -> Put:
        return Put(self.key, encode(self.to_record()))


def _int(record: dict[str, Any], key: str) -> int:
    value = record.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StatusError(f"{key} must be an integer, not {type(value).__name__}")
    return value


def _str(record: dict[str, Any], key: str) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise StatusError(f"{key} must be a string, not {type(value).__name__}")
    return value


def _entries(record: dict[str, Any], key: str, bound: int) -> tuple[dict[str, Any], ...]:
    value = record.get(key) or []
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise StatusError(f"{key} must be a list of maps")
    return tuple(value[-bound:])


def from_record(namespace: str, name: str, record: Any, mod_revision: int = 0) -> Status:
    if not isinstance(record, dict):
        raise StatusError(f"status {namespace}/{name}: not a map")
    try:
        version = record.get("version", STATUS_VERSION)
        if version != STATUS_VERSION:
            raise StatusError(f"version {version!r} is not {STATUS_VERSION}")
        phase = record.get("phase")
        if phase not in PHASES:
            raise StatusError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
        analysis = record.get("lastAnalysis") or {}
        if not isinstance(analysis, dict):
            raise StatusError("lastAnalysis must be a map")
        updated = record.get("updated", 0.0)
        if not isinstance(updated, int | float) or isinstance(updated, bool):
            raise StatusError("updated must be a number")
        return Status(
            namespace=namespace,
            name=name,
            phase=cast(Phase, phase),
            host=_str(record, "host"),
            stable=_str(record, "stable"),
            canary=_str(record, "canary"),
            weight=_int(record, "weight"),
            failed_checks=_int(record, "failedChecks"),
            iteration=_int(record, "iteration"),
            last_analysis={
                str(k): (float(v) if isinstance(v, int | float) else None)
                for k, v in analysis.items()
            },
            events=_entries(record, "events", MAX_EVENTS),
            history=_entries(record, "history", MAX_HISTORY),
            updated=float(updated),
            observed=_int(record, "observed"),
            resume_phase=_str(record, "resumePhase"),
            mod_revision=mod_revision,
        )
    except StatusError as exc:
        raise StatusError(f"status {namespace}/{name}: {exc}") from None


def from_kv(kv: KeyValue) -> Status:
    namespace, _, name = kv.key.removeprefix(ROLLOUTS).partition("/")
    try:
        record = decode(kv)
    except DecodeError as exc:
        raise StatusError(str(exc)) from None
    return from_record(namespace, name, record, kv.mod_revision)


async def read_status(store: Store, namespace: str, name: str) -> Status | None:
    """The status of rollout namespace/name, or None before the controller first wrote it."""
    kv = await store.get(status_key(namespace, name))
    return None if kv is None else from_kv(kv)


async def list_statuses(store: Store) -> list[Status]:
    """Every rollout's status, by namespace and name; unreadable records are skipped."""
    kvs, _ = await store.range(ROLLOUTS)
    out = []
    for kv in kvs:
        try:
            out.append(from_kv(kv))
        except StatusError:
            continue
    return out
