"""The pickers of every cluster the proxies talk to, keyed by (service, subset, port).

`registry.picker_for(snapshot, service, subset, port)` is what the L4 proxy and the HTTP engine
call per connection or request. Same snapshot as last time: the cached picker, at the cost of one
dict lookup. A new snapshot: the endpoints and the resolved policy are recomputed; when neither
changed the picker is kept as is, otherwise a new picker is built that takes over the old one's
per-address state (in-flight counts, latency estimates, ejections) and its circuit breaker.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.balance.errors import PolicyError
from nodeagent.balance.outlier import OutlierEvent
from nodeagent.balance.picker import Picker
from nodeagent.balance.policy import DEFAULT_POLICY, ConnectionPool, TrafficPolicy, resolve
from nodeagent.balance.shared import ClusterStreaks, SharedCounts, SharedSlot
from nodeagent.balance.state import Clock
from nodeagent.log import get_logger
from nodeagent.snapshot import Snapshot
from nodeagent.snapshot.model import Endpoint, Service

log = get_logger("balance")

ClusterKey = tuple[str, str, str, str | None, int, str | None]


def cluster_name(service: Service, subset: str | None, port: int) -> str:
    """Envoy-style: `outbound|80|v1|reviews.default.svc.cluster.local`."""
    return f"outbound|{port}|{subset or ''}|{service.hostname}"


def log_event(event: OutlierEvent) -> None:
    if event.kind == "readmitted":
        log.info(
            "outlier.readmitted",
            cluster=event.cluster,
            endpoint=event.endpoint,
            ejections=event.ejections,
        )
    else:
        log.warning(
            f"outlier.{event.kind}",
            cluster=event.cluster,
            endpoint=event.endpoint,
            reason=event.reason,
            ejections=event.ejections,
            until=event.until,
        )


@dataclass(slots=True)
class _Entry:
    snapshot: Snapshot
    endpoints: tuple[Endpoint, ...]
    policy: TrafficPolicy
    picker: Picker


def _scope(key: ClusterKey, name: str) -> str:
    """A cluster's key in the workers' shared table (its breaker slot, its endpoints' streaks)."""
    return f"{name}|{key[0]}|{key[5] or ''}"


class Registry:
    def __init__(
        self,
        *,
        now: Clock = time.monotonic,
        rng: random.Random | None = None,
        on_event: Callable[[OutlierEvent], None] | None = log_event,
        max_clusters: int = 10_000,
        shared: SharedCounts | None = None,
    ) -> None:
        """`shared`: the workers' breaker table (`--workers N`): limits bound the node's sum."""
        self._now = now
        self.shared = shared
        self._rng = rng if rng is not None else random.Random()
        self._on_event = on_event
        self._max = max_clusters
        self._entries: dict[ClusterKey, _Entry] = {}
        self.rebuilds = 0

    def picker_for(
        self,
        snapshot: Snapshot,
        service: Service,
        subset: str | None,
        port: int,
        *,
        from_namespace: str | None = None,
    ) -> Picker:
        """The picker for traffic to `port` (a service port number) of `service`, in `subset`."""
        key: ClusterKey = (
            service.kind,
            service.namespace,
            service.name,
            subset,
            port,
            from_namespace,
        )
        entry = self._entries.get(key)
        if entry is not None and entry.snapshot is snapshot:
            return entry.picker
        name = cluster_name(service, subset, port)
        dr = snapshot.destination_rule(service.hostname, from_namespace)
        endpoints: tuple[Endpoint, ...]
        if subset is not None:
            s = dr.subset(subset) if dr is not None else None
            # Istio: a route to an undefined subset has no cluster (503 NR); here, no endpoints.
            endpoints = snapshot.endpoints(service, port, subset=s.labels) if s is not None else ()
        else:
            endpoints = snapshot.endpoints(service, port)
        try:
            policy = resolve(dr, subset, port)
        except PolicyError as e:
            # Traffic keeps flowing with the defaults; the bad field is named once per change.
            log.warning("balance.policy_invalid", cluster=name, rule=dr and dr.ref, error=str(e))
            policy = DEFAULT_POLICY
        if entry is not None and entry.endpoints == endpoints and entry.policy == policy:
            entry.snapshot = snapshot
            return entry.picker
        picker = Picker(
            name,
            policy,
            endpoints,
            now=self._now,
            rng=self._rng,
            previous=entry.picker if entry is not None else None,
            shared=self._shared_slot(key, name) if entry is None else None,
            streaks=self._streaks(key, name) if entry is None else None,
            on_event=self._on_event,
        )
        self.rebuilds += 1
        if entry is None and len(self._entries) >= self._max:
            # Bounded: forget the oldest cluster (dicts keep insertion order).
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = _Entry(snapshot, endpoints, policy, picker)
        return picker

    def _shared_slot(self, key: ClusterKey, name: str) -> SharedSlot | None:
        if self.shared is None:
            return None
        return self.shared.slot(_scope(key, name))

    def _streaks(self, key: ClusterKey, name: str) -> ClusterStreaks | None:
        if self.shared is None:
            return None
        return ClusterStreaks(self.shared.streaks, _scope(key, name))

    def adopt_ejection(self, cluster: str, endpoint: str, backoff: int) -> int:
        """Another worker process ejected `endpoint` of `cluster` (a cluster name): eject it
        in every picker of that name here too; how many did."""
        pickers = [e.picker for e in self._entries.values() if e.picker.cluster == cluster]
        return sum(p.adopt_ejection(endpoint, backoff) for p in pickers)

    def prune(self, snapshot: Snapshot) -> int:
        """Forget the clusters of services that no longer exist; returns how many."""
        gone = [k for k in self._entries if snapshot.service(k[1], k[2], kind=k[0]) is None]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def maintain(self) -> list[OutlierEvent]:
        """Run every due outlier sweep (readmissions without traffic)."""
        events: list[OutlierEvent] = []
        for entry in self._entries.values():
            events.extend(entry.picker.maintain())
        return events

    def pickers(self) -> list[Picker]:
        return [e.picker for e in self._entries.values()]

    def breaker_statistics(self) -> list[dict[str, Any]]:
        """The breakers of clusters whose DestinationRule sets connection-pool limits (the
        others cannot overflow): what a worker reports to the control for `/config_dump`."""
        default = ConnectionPool()
        return [
            {"cluster": e.picker.cluster, **e.picker.breaker.statistics()}
            for e in self._entries.values()
            if e.policy.pool != default
        ]

    def statistics(self) -> dict[str, Any]:
        return {
            "clusters": len(self._entries),
            "rebuilds": self.rebuilds,
            "pickers": [e.picker.statistics() for e in self._entries.values()],
        }
