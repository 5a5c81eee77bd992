"""Which workload deletions to hold back because their node's lease lapsed (pure, no I/O).

A node's agent puts its workloads and its node record (`/mesh/v1/nodes/<node>`) under one lease.
When the store deletes the node record, the lease lapsed: the agent died, or the store stalled
for longer than the TTL and expired every lease at once while every agent was fine (they put
everything back within a second or so of the store's return). Applying those deletions at once
turns a slow store into a mesh-wide outage. So, as Istio keeps an auto-registered WorkloadEntry
for a grace period after its proxy disconnects, and ztunnel keeps serving its last workloads
without the control plane, a workload deleted in the same revision as its node record (or within
`grace` seconds after it) is held for `grace` seconds: a put of the same key (the agent is back)
ends the hold, the deadline applies the deletion. A workload deleted while its node record lives
is an explicit removal (CNI DEL, `nodeagent uninstall`) and goes at once; so is one of a node
that never had a record (registered by `meshctl apply`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from nodeagent.store import keys
from nodeagent.store.base import Event, KeyValue


def node_of_record(key: str) -> str | None:
    """The node a node-record key names, or None."""
    if key.startswith(keys.NODES):
        name = key[len(keys.NODES) :]
        if name and "/" not in name:
            return name
    return None


def node_of_workload(key: str) -> str | None:
    """The node a workload key is registered under, or None."""
    if key.startswith(keys.WORKLOADS):
        parts = key[len(keys.WORKLOADS) :].split("/")
        if len(parts) == 2 and all(parts):
            return parts[0]
    return None


class LeaseGrace:
    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._nodes: set[str] = set()  # the nodes whose record lives
        self._lapsed: dict[str, float] = {}  # node → when its record was deleted
        self._held: dict[str, float] = {}  # workload key → when its deletion is applied

    @property
    def held(self) -> Mapping[str, float]:
        return self._held

    def filter(self, events: Sequence[Event], now: float) -> list[Event]:
        """The events to apply now; the deletions of lapsed nodes' workloads are held.

        A lapse deletes the node record and the workloads in one revision (in any order within
        it); a workload deleted in an earlier revision of the same batch (uninstall's order:
        workloads, then the record) was removed on purpose and goes."""
        if self.grace <= 0:
            return list(events)
        lapse_revision = {
            node: e.kv.mod_revision
            for e in events
            if e.type == "delete" and (node := node_of_record(e.kv.key)) is not None
        }
        out = []
        for event in events:
            key = event.kv.key
            record_of = node_of_record(key)
            if record_of is not None:
                if event.type == "put":
                    self._nodes.add(record_of)
                    self._lapsed.pop(record_of, None)
                elif record_of in self._nodes:
                    self._nodes.discard(record_of)
                    self._lapsed[record_of] = now
                out.append(event)
                continue
            node = node_of_workload(key)
            if node is None:
                out.append(event)
            elif event.type == "put":
                self._held.pop(key, None)
                out.append(event)
            elif lapse_revision.get(node) == event.kv.mod_revision or self._lapsed_recently(
                node, now
            ):
                self._held.setdefault(key, now + self.grace)
            else:
                out.append(event)
        return out

    def relist(
        self, listed: Iterable[KeyValue], before: Iterable[str], now: float
    ) -> tuple[list[KeyValue], set[str]]:
        """A fresh listing, and of `before` (the keys of the documents held until now) those
        the listing lacks but that stay: the held workloads and those of nodes that lapsed
        since the last view."""
        kvs = list(listed)
        if self.grace <= 0:
            return kvs, set()
        listed_keys = {kv.key for kv in kvs}
        nodes = {n for kv in kvs if (n := node_of_record(kv.key)) is not None}
        for node in self._nodes - nodes:
            self._lapsed[node] = now
        for node in nodes:
            self._lapsed.pop(node, None)
        self._nodes = nodes
        for key in listed_keys & self._held.keys():
            del self._held[key]
        keep = set()
        for key in before:
            owner = node_of_workload(key)
            if key in listed_keys or owner is None:
                continue
            if key in self._held or self._lapsed_recently(owner, now):
                self._held.setdefault(key, now + self.grace)
                keep.add(key)
        return kvs, keep

    def load_nodes(self, kvs: Iterable[KeyValue]) -> None:
        """The node records of a disk cache: the nodes that were live when it was written."""
        self._nodes = {n for kv in kvs if (n := node_of_record(kv.key)) is not None}

    def next_deadline(self) -> float | None:
        return min(self._held.values(), default=None)

    def expired(self, now: float) -> list[str]:
        """The held keys whose grace is over (no longer held: delete them now)."""
        done = sorted(k for k, deadline in self._held.items() if deadline <= now)
        for key in done:
            del self._held[key]
        for node, since in list(self._lapsed.items()):
            if since + self.grace <= now:
                del self._lapsed[node]
        return done

    def _lapsed_recently(self, node: str, now: float) -> bool:
        since = self._lapsed.get(node)
        return since is not None and now - since < self.grace
