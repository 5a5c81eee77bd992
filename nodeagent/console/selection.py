"""Which workloads a Service selects (and, narrowed by a DestinationRule subset's labels, which
of them a subset matches): the one selection the graph, the details and the checks share."""

from __future__ import annotations

from collections.abc import Mapping

from nodeagent.snapshot import Snapshot, Workload
from nodeagent.snapshot.hosts import labels_match
from nodeagent.snapshot.model import Service


def backends(
    snap: Snapshot, service: Service | None, subset: Mapping[str, str] | None = None
) -> list[Workload]:
    """The workloads of the service's namespace its selector picks, that also carry `subset`'s
    labels, by namespace/name. None for a service without a selector (no selected pods)."""
    if service is None or service.selector is None:
        return []
    selector = service.selector
    return sorted(
        (
            w
            for w in snap.workloads()
            if w.namespace == service.namespace
            and labels_match(selector, w.labels)
            and labels_match(subset or {}, w.labels)
        ),
        key=lambda w: w.ref,
    )
