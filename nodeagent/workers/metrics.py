"""What the control process knows of its workers' counters: each live worker's last report and
the sum of every dead worker's last one (`retired`), so the node's totals only ever grow.

A worker reports its registry's state (nodeagent.telemetry.merge) and its pods' connection
counters every `REPORT_INTERVAL`; both are cumulative since that worker process started. When
a worker dies its last report moves to `retired` (connections it had open count as closed: its
process took them down), and its successor starts from zero: the sum `retired + live` never
double-counts and never goes back. What a worker counted after its last report before a kill -9
is lost (at most one interval of that worker's traffic). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nodeagent.telemetry.merge import FamilyState, merge_states

PodStats = dict[str, dict[str, int]]  # direction → counter → value (PodProxy.statistics())


def add_pod_stats(into: PodStats, stats: PodStats) -> None:
    for direction, counters in stats.items():
        row = into.setdefault(direction, {})
        for name, value in counters.items():
            row[name] = row.get(name, 0) + int(value)


@dataclass(slots=True)
class WorkerReport:
    metrics: list[FamilyState] = field(default_factory=list)
    pods: dict[str, PodStats] = field(default_factory=dict)  # pod uid → statistics
    pools: dict[str, dict[str, int]] = field(default_factory=dict)  # pod uid → its HBONE pool
    breakers: list[dict[str, Any]] = field(default_factory=list)  # its limited clusters' breakers

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> WorkerReport:
        return cls(
            list(msg.get("metrics") or []),
            dict(msg.get("pods") or {}),
            dict(msg.get("pools") or {}),
            list(msg.get("breakers") or []),
        )

    def connections(self) -> int:
        return sum(s.get("opened", 0) for p in self.pods.values() for s in p.values())


@dataclass(slots=True)
class WorkerBook:
    live: dict[int, WorkerReport] = field(default_factory=dict)  # worker slot → last report
    retired_metrics: list[FamilyState] = field(default_factory=list)
    retired_pods: dict[str, PodStats] = field(default_factory=dict)

    def breakers(self) -> list[dict[str, Any]]:
        """Per limited cluster: the node's counts (the shared table's sums, as the last report
        read them) and each live worker's own active and overflow counts."""
        merged: dict[str, dict[str, Any]] = {}
        for slot in sorted(self.live):
            for b in self.live[slot].breakers:
                row = merged.setdefault(str(b.get("cluster")), {"node": {}, "workers": []})
                row["node"] = b.get("node") or row["node"]
                own = {"slot": slot, "active": b.get("active"), "overflow": b.get("overflow")}
                row["workers"].append(own)
        return [{"cluster": name, **row} for name, row in merged.items()]

    def report(self, slot: int, report: WorkerReport) -> None:
        self.live[slot] = report

    def retire(self, slot: int) -> None:
        """The worker in `slot` died: keep its last counters, its open connections closed."""
        last = self.live.pop(slot, None)
        if last is None:
            return
        self.retired_metrics = list(
            merge_states([self.retired_metrics, last.metrics]).families.values()
        )
        for uid, stats in last.pods.items():
            closed: PodStats = {}
            for direction, counters in stats.items():
                row = dict(counters)
                if "opened" in row:
                    row["closed"] = row["opened"]
                closed[direction] = row
            add_pod_stats(self.retired_pods.setdefault(uid, {}), closed)

    def metric_states(self) -> list[list[FamilyState]]:
        """Every group to add to the control's own registry (one per worker, the retired sum)."""
        return [self.retired_metrics, *(r.metrics for r in self.live.values())]

    def pod_statistics(self, uid: str) -> PodStats:
        total: PodStats = {}
        add_pod_stats(total, self.retired_pods.get(uid, {}))
        for report in self.live.values():
            add_pod_stats(total, report.pods.get(uid, {}))
        return total

    def pool_statistics(self, uid: str) -> dict[str, int]:
        """The pod's HBONE pools in the live workers, summed (live state: a dead worker's
        connections went with it)."""
        total: dict[str, int] = {}
        for report in self.live.values():
            for name, value in report.pools.get(uid, {}).items():
                total[name] = total.get(name, 0) + int(value)
        return total

    def forget_pod(self, uid: str) -> None:
        self.retired_pods.pop(uid, None)
