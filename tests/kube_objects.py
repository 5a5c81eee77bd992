"""Kubernetes objects into a store exactly as kube-sync writes them: its own `Mirror`
(conversion, validation, key layout, VIP claims), driven from a synchronous test."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from nodeagent.kube.mirror import Mirror
from nodeagent.kube.resources import BY_KIND
from nodeagent.store import open_store


def mirror(url: str, *objects: Mapping[str, Any], delete: bool = False) -> dict[str, int]:
    """ADDED/MODIFIED (or, with `delete`, DELETED) events for `objects`, in order, written
    into the store at `url`; the mirror's statistics (a rejected object is a test bug)."""

    async def run() -> dict[str, int]:
        store = await open_store(url)
        try:
            m = Mirror(store)
            for obj in objects:
                rtype = BY_KIND[obj["kind"]]
                await (m.remove(rtype, obj) if delete else m.upsert(rtype, obj))
            return m.statistics()
        finally:
            await store.aclose()

    stats = trio.run(run)
    assert stats["rejected"] == 0, f"kube-sync would reject: {objects}"
    return stats
