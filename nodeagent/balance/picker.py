"""One cluster's stateful picker: balancer + health (outlier ejection, panic) + circuit breaker.

A cluster is (service, subset, port). `pick(ctx)` returns the `EndpointState` handle of the
chosen endpoint; the caller brackets the request with `handle.start()` / `handle.finish(latency,
outcome)`, which feeds the latency estimate and outlier detection back here.

Health: only endpoints that are not ejected are picked, unless fewer than `panic_percent` % of
them are healthy; then every endpoint is (Envoy's panic mode: spreading load over possibly bad
endpoints beats failing everything). A threshold of 0 disables panic mode: with every endpoint
ejected, `pick` raises `NoHealthyUpstream`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from nodeagent.balance.balancers import (
    DEFAULT_DECAY_S,
    DEFAULT_RTT_S,
    PassthroughBalancer,
    make_balancer,
    observe_rtt,
)
from nodeagent.balance.errors import NoHealthyUpstream
from nodeagent.balance.outlier import OutlierDetector, OutlierEvent
from nodeagent.balance.policy import TrafficPolicy
from nodeagent.balance.pool import CircuitBreaker
from nodeagent.balance.shared import ClusterStreaks, SharedSlot
from nodeagent.balance.state import NO_CONTEXT, Clock, EndpointState, Outcome, PickContext
from nodeagent.snapshot.model import Endpoint

EventSink = Callable[[OutlierEvent], None]
# A failure's latency sample is at least this: a backend failing fast would otherwise look like
# the fastest one and attract traffic until outlier detection ejects it (the "black hole").
FAILURE_PENALTY_S = 0.25
MAX_EVENTS = 256
_RETRY_DRAWS = 3


class Picker:
    def __init__(
        self,
        cluster: str,
        policy: TrafficPolicy,
        endpoints: Sequence[Endpoint],
        *,
        now: Clock,
        rng: random.Random | None = None,
        previous: Picker | None = None,
        shared: SharedSlot | None = None,
        streaks: ClusterStreaks | None = None,
        on_event: EventSink | None = None,
        default_rtt_s: float = DEFAULT_RTT_S,
        decay_s: float = DEFAULT_DECAY_S,
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.endpoints = tuple(endpoints)
        self._now = now
        self._rng = rng if rng is not None else random.Random()
        self._on_event = on_event
        self._default_rtt = default_rtt_s
        self._decay_s = decay_s
        self.events: deque[OutlierEvent] = deque(maxlen=MAX_EVENTS)
        t = now()
        old = previous._by_key if previous is not None else {}
        self._by_key: dict[str, EndpointState] = {}
        for ep in self.endpoints:
            key = f"{ep.address}:{ep.port}"
            if key in self._by_key:
                continue  # one state per address even if listed twice
            s = old.get(key)
            if s is None:
                s = EndpointState(ep, self, default_rtt_s, t)
            else:
                s.endpoint = ep  # labels or workload may have changed
                s.picker = self
            self._by_key[key] = s
        for key, s in old.items():
            if key not in self._by_key:
                s.picker = None  # handles still in flight finish without effect
        self.states: list[EndpointState] = list(self._by_key.values())
        self.breaker: CircuitBreaker
        if previous is not None:
            self.breaker = previous.breaker
            self.breaker.limits = policy.pool
        else:
            self.breaker = CircuitBreaker(cluster, policy.pool, shared=shared)
        # The workers' shared error streaks of this cluster (kept across rebuilds, as the breaker).
        self.streaks: ClusterStreaks | None = previous.streaks if previous is not None else streaks
        self.outlier: OutlierDetector | None = None
        if policy.outlier is not None:
            self.outlier = OutlierDetector(cluster, policy.outlier, t, streaks=self.streaks)
            self.outlier.ejected_count = sum(1 for s in self.states if s.ejected)
        else:
            for s in self.states:
                s.ejected = False
        self.balancer = make_balancer(
            policy.load_balancer, self._rng, decay_s=decay_s, make_state=self._untracked
        )
        self.balancer.rebuild(self.states)
        self._passthrough = isinstance(self.balancer, PassthroughBalancer)
        self.panic = False
        self._picks: int = previous._picks if previous is not None else 0
        self._candidates: list[EndpointState] = []
        self._refresh()

    # -- the hot path --------------------------------------------------------------------------

    def pick(
        self, ctx: PickContext = NO_CONTEXT, *, avoid: EndpointState | None = None
    ) -> EndpointState:
        """Choose an endpoint; raises NoHealthyUpstream when there is none to choose.

        `avoid`: the endpoint a retry should not go back to (Istio's previous-hosts retry
        predicate); a few more draws, then any candidate but it, if there is one.
        """
        now = self._now()
        od = self.outlier
        if od is not None and now >= od.next_sweep:
            self._sweep(now)
        candidates = self._candidates
        if not candidates and not (self._passthrough and ctx.original_dst is not None):
            raise NoHealthyUpstream(self.cluster, len(self.states))
        s = self.balancer.pick(candidates, ctx, now)
        if s is avoid and len(candidates) > 1:
            for _ in range(_RETRY_DRAWS):
                s = self.balancer.pick(candidates, ctx, now)
                if s is not avoid:
                    break
            else:
                s = candidates[0] if candidates[0] is not avoid else candidates[1]
        s.requests += 1
        self._picks += 1
        s.picked_at = self._picks
        return s

    def record(self, s: EndpointState, latency_s: float, outcome: Outcome) -> None:
        """A request on `s` ended (called by `EndpointState.finish`)."""
        now = self._now()
        if outcome is Outcome.CANCELLED:
            return
        if outcome is not Outcome.SUCCESS:
            s.failures += 1
            if latency_s < FAILURE_PENALTY_S:
                latency_s = FAILURE_PENALTY_S
        observe_rtt(s, latency_s, now, self._decay_s, failed=outcome is not Outcome.SUCCESS)
        od = self.outlier
        if od is None:
            return
        event = od.record(s, outcome, now, len(self.states))
        if event is not None:
            if event.kind == "ejected":
                self._refresh()
            self._emit(event)
        if now >= od.next_sweep:
            self._sweep(now)

    # -- health --------------------------------------------------------------------------------

    def adopt_ejection(self, key: str, backoff: int) -> bool:
        """Another worker ejected endpoint `key` ("address:port") of this cluster: so does this
        picker (`OutlierDetector.adopt`); whether it did."""
        od, s = self.outlier, self._by_key.get(key)
        if od is None or s is None or not od.adopt(s, backoff, self._now(), len(self.states)):
            return False
        self._refresh()
        return True

    def maintain(self) -> list[OutlierEvent]:
        """Run the outlier sweep if it is due (readmissions); the proxy may call it on a timer
        so that readmission events are logged even for a cluster that gets no traffic."""
        od = self.outlier
        now = self._now()
        if od is None or now < od.next_sweep:
            return []
        return self._sweep(now)

    def _sweep(self, now: float) -> list[OutlierEvent]:
        assert self.outlier is not None
        events = self.outlier.sweep(self.states, now)
        if events:
            self._refresh()
            for e in events:
                self._emit(e)
        return events

    def _emit(self, event: OutlierEvent) -> None:
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _refresh(self) -> None:
        healthy = [s for s in self.states if not s.ejected]
        total = len(self.states)
        self.panic = total > 0 and 100.0 * len(healthy) < self.policy.panic_percent * total
        chosen = self.states if self.panic else healthy
        for s in self.states:
            s.available = False
        for s in chosen:
            s.available = True
        self._candidates = list(chosen)

    def _untracked(self, address: str, port: int) -> EndpointState:
        return EndpointState(Endpoint(address, port), None, self._default_rtt, self._now())

    # -- introspection -------------------------------------------------------------------------

    def state(self, address: str, port: int) -> EndpointState | None:
        return self._by_key.get(f"{address}:{port}")

    @property
    def healthy(self) -> list[EndpointState]:
        return [s for s in self.states if not s.ejected]

    @property
    def ejected(self) -> list[EndpointState]:
        return [s for s in self.states if s.ejected]

    def statistics(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "balancer": self.balancer.kind,
            "panic": self.panic,
            "endpoints": [
                {
                    "endpoint": s.key,
                    "in_flight": s.in_flight,
                    "rtt_ms": round(s.rtt * 1000, 3),
                    "requests": s.requests,
                    "failures": s.failures,
                    "ejected": s.ejected,
                    "ejections": s.ejections,
                }
                for s in self.states
            ],
            "circuit_breaker": self.breaker.statistics(),
        }
