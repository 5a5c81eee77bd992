"""`nodeagent controller`'s loop: every tick, every Rollout in the store moves one step if due.

The store is the rollout's only memory: the status record says the phase, the weight and
when the current step began, so a restarted controller (or a new leader) continues where the
last one was. What lives only in memory is each rollout's baseline reading of the counters
(taken when its step began); after a restart the first reading is the baseline and the
interrupted step is measured over a full interval from then. Every move is one transaction
(`commit`); a store error skips the tick (the rollout waits, nothing is half-applied).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from nodeagent.log import get_logger
from nodeagent.rollout import analysis
from nodeagent.rollout.commit import Loaded, commit, load_kv, rollout_prefix
from nodeagent.rollout.metrics import Counters, Figures, select, window
from nodeagent.rollout.model import Rollout, Webhook, WebhookType
from nodeagent.rollout.routes import RouteError, check, subset_labels
from nodeagent.rollout.sources import Reading, Source, SourceError, http_call
from nodeagent.rollout.status import ROLLOUTS, TERMINAL, Status
from nodeagent.rollout.windows import Window, windows_key
from nodeagent.store.base import Compare, Delete, Store, StoreError
from nodeagent.store.codec import DecodeError
from nodeagent.telemetry.metrics import version_label

log = get_logger("rollout.controller")
TICK = 0.2


@dataclass(frozen=True, slots=True)
class Baseline:
    time: float
    counters: Counters


def versions_of(loaded: Loaded) -> dict[str, str]:
    """subset → the destination_version its workloads report (their `version` label)."""
    dr = loaded.dr_body()
    r = loaded.rollout
    return {s: version_label(subset_labels(dr, s)) for s in (r.stable, r.canary)}


async def call_webhooks(hooks: tuple[Webhook, ...], rollout: Rollout, phase: str) -> str:
    """ "" when every gate answered 2xx, else what failed."""
    for hook in hooks:
        payload = {
            "name": rollout.name,
            "namespace": rollout.namespace,
            "phase": phase,
            "metadata": dict(hook.metadata),
        }
        try:
            code, _ = await http_call(
                "POST", hook.url, within=hook.timeout, body=json.dumps(payload).encode()
            )
        except SourceError as exc:
            return f"webhook {hook.name}: {exc}"
        if not 200 <= code < 300:
            return f"webhook {hook.name}: HTTP {code}"
    return ""


class Controller:
    def __init__(
        self,
        store: Store,
        source: Source,
        *,
        tick: float = TICK,
        clock: Callable[[], float] = time.time,
        fence: Callable[[], Compare | None] = lambda: None,
    ) -> None:
        self.store = store
        self.fence = fence
        self.source = source
        self.tick = tick
        self.clock = clock
        self.baselines: dict[str, Baseline] = {}
        self.moves = 0  # committed moves, for tests and logs

    async def run(self) -> None:
        """Until cancelled (leading ends): reconcile every rollout each tick."""
        log.info("rollout.controller.leading")
        while True:
            try:
                await self.reconcile_all()
            except StoreError as exc:
                log.warning("rollout.controller.store_unavailable", error=str(exc))
            await trio.sleep(self.tick)

    async def reconcile_all(self) -> None:
        kvs, _ = await self.store.range(rollout_prefix())
        reading: Reading | None = None
        seen = set()
        for kv in kvs:
            try:
                loaded = await load_kv(self.store, kv)
            except (DecodeError, KeyError, ValueError) as exc:
                log.error("rollout.invalid", key=kv.key, error=str(exc))
                continue
            seen.add(loaded.rollout.ref)
            reading = await self.reconcile(loaded, reading)
        for ref in set(self.baselines) - seen:
            del self.baselines[ref]
        await self._forget_deleted(seen)

    async def _forget_deleted(self, existing: set[str]) -> None:
        """The status and windows of a deleted Rollout go with it (one transaction each)."""
        kvs, _ = await self.store.range(ROLLOUTS)
        for kv in kvs:
            ref = kv.key.removeprefix(ROLLOUTS)
            if ref in existing:
                continue
            namespace, _, name = ref.partition("/")
            fence = self.fence()
            await self.store.txn(
                [*([fence] if fence is not None else []), Compare(kv.key, kv.mod_revision)],
                [Delete(kv.key), Delete(windows_key(namespace, name))],
            )
            log.info("rollout.forgotten", rollout=ref)

    async def _read(self, reading: Reading | None) -> Reading:
        return reading if reading is not None else await self.source.read()

    async def reconcile(self, loaded: Loaded, reading: Reading | None) -> Reading | None:
        """One rollout, one step at most; returns the tick's reading (shared by rollouts)."""
        r, now = loaded.rollout, self.clock()
        status = loaded.status
        if status is None or (status.observed != loaded.revision and _restarts(r, status)):
            self.baselines.pop(r.ref, None)
            await self._commit(loaded, analysis.Move(analysis.start(r, loaded.revision, now)))
            return reading
        if status.observed != loaded.revision:  # same subsets, new settings: carry on
            status = replace(status, observed=loaded.revision)
            loaded = replace(loaded, status=status)
        try:
            check(r, loaded.vs_body(), loaded.dr_body())
        except RouteError as exc:
            if status.phase not in TERMINAL:
                await self._commit(loaded, analysis.abort(r, status, now, str(exc)))
            return reading
        if status.phase == "Initializing":
            if status.failed_checks and now < status.step_started + r.interval:
                return reading  # a failed pre-rollout gate is tried again an interval later
            gates = await call_webhooks(r.webhooks_of("pre-rollout"), r, status.phase)
            if gates:
                move = analysis.step(r, status, analysis.Check(False, {}, gates), now)
                await self._commit(loaded, move)
                return reading
            reading = await self._baseline(loaded, reading, now)
            if reading is not None:
                await self._commit(loaded, analysis.begin(r, status, now))
            return reading
        if status.phase == "Promoting":
            if await self._commit(loaded, analysis.promote(r, status, now)):
                await self._post_rollout(r, "Succeeded")
            return reading
        if status.phase != "Progressing":
            self.baselines.pop(r.ref, None)
            return reading
        base = self.baselines.get(r.ref)
        if base is None:
            return await self._baseline(loaded, reading, now)
        if now < max(status.step_started, base.time) + r.interval:
            return reading
        versions = versions_of(loaded)
        try:
            reading = await self._read(reading)
        except SourceError as exc:
            move = analysis.step(r, status, analysis.Check(False, {}, f"metrics: {exc}"), now)
            self.baselines.pop(r.ref, None)
            await self._commit(loaded, move)
            return reading
        after = _counters(reading, r.fqdn)
        by_version = window(base.counters, after)
        subsets = {s: by_version.get(v, Figures()) for s, v in versions.items()}
        gates = await call_webhooks(r.webhooks_of("rollout"), r, status.phase)
        result = analysis.evaluate(r, subsets[r.canary], gates)
        move = analysis.step(r, status, result, now)
        measured = Window(base.time, now, subsets) if result.passed is not None else None
        if await self._commit(loaded, move, measured):
            if result.passed is not None:
                self.baselines[r.ref] = Baseline(now, after)
            if move.status.phase == "Failed":
                await self._post_rollout(r, "Failed")
        return reading

    async def _baseline(
        self, loaded: Loaded, reading: Reading | None, now: float
    ) -> Reading | None:
        try:
            reading = await self._read(reading)
        except SourceError as exc:
            log.warning("rollout.metrics_unavailable", rollout=loaded.rollout.ref, error=str(exc))
            return None
        self.baselines[loaded.rollout.ref] = Baseline(now, _counters(reading, loaded.rollout.fqdn))
        return reading

    async def _commit(
        self, loaded: Loaded, move: analysis.Move, measured: Window | None = None
    ) -> bool:
        r = loaded.rollout
        try:
            done = await commit(self.store, loaded, move, measured, fence=self.fence())
        except RouteError as exc:
            failed = analysis.abort(r, _base_status(loaded, move), self.clock(), str(exc))
            failed = replace(failed, route="none")
            done = await commit(self.store, loaded, failed, fence=self.fence())
            move = failed
        if not done:
            log.info("rollout.conflict", rollout=r.ref, phase=move.status.phase)
            return False
        self.moves += 1
        last = move.status.events[-1]["message"] if move.status.events else ""
        log.info(
            "rollout.step",
            rollout=r.ref,
            phase=move.status.phase,
            weight=move.status.weight,
            failed_checks=move.status.failed_checks,
            message=last,
        )
        return True

    async def _post_rollout(self, r: Rollout, phase: str) -> None:
        hooks = r.webhooks_of(_POST)
        if hooks:
            problem = await call_webhooks(hooks, r, phase)
            if problem:
                log.warning("rollout.post_rollout_failed", rollout=r.ref, error=problem)


_POST: WebhookType = "post-rollout"


def _base_status(loaded: Loaded, move: analysis.Move) -> Status:
    return loaded.status if loaded.status is not None else move.status


def _restarts(r: Rollout, status: Status) -> bool:
    """A re-applied Rollout starts a new run when the last ended or its subsets changed."""
    return status.phase in TERMINAL or (status.stable, status.canary) != (r.stable, r.canary)


def _counters(reading: Reading, host_fqdn: str) -> Counters:
    out: Counters = {}
    for instance, samples in reading:
        out.update(select(instance, samples, host_fqdn))
    return out
