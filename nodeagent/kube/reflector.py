"""List then watch one resource type into the store, as client-go's reflector does.

List in pages (`limit`/`continue`), mirror the whole list (`Mirror.resync`), then watch from
the list's resourceVersion with bookmarks. Every event moves the resume point; a watch that the
server ends (its `timeoutSeconds`) or a dropped connection resumes from there. 410 Gone — as an
HTTP status or as an `ERROR` event carrying a `Status` with code 410 — means that point is
compacted away: re-list. Other errors back off (bounded, doubling) and resume.

`next_action` is the pure part: what one watch event means for the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import trio

from nodeagent.kube.client import Gone, KubeClient, KubeError, with_query
from nodeagent.kube.mirror import Mirror
from nodeagent.kube.resources import ResourceType
from nodeagent.log import get_logger
from nodeagent.store.base import StoreError

log = get_logger("kube.reflector")

PAGE_SIZE = 500
MAX_PAGES = 10_000


class WatchError(KubeError):
    """The server sent an ERROR event that is not 410 (its Status message kept)."""


@dataclass(frozen=True, slots=True)
class Action:
    op: Literal["upsert", "remove", "bookmark", "relist"]
    obj: Mapping[str, Any]
    resource_version: str | None


def _rv(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("resourceVersion"), str):
        return str(meta["resourceVersion"])
    return None


def next_action(event: Mapping[str, Any]) -> Action:
    """Decide what a watch event means. Raises WatchError for an error or malformed event."""
    etype = event.get("type")
    obj = event.get("object")
    if not isinstance(obj, dict):
        raise WatchError(f"watch event {etype!r} without an object")
    if etype == "ERROR":
        code = obj.get("code")
        if code == 410 or obj.get("reason") in ("Expired", "Gone"):
            return Action("relist", obj, None)
        raise WatchError(f"watch ERROR event: {obj.get('code')} {obj.get('message')}")
    rv = _rv(obj)
    if etype in ("ADDED", "MODIFIED"):
        return Action("upsert", obj, rv)
    if etype == "DELETED":
        return Action("remove", obj, rv)
    if etype == "BOOKMARK":
        return Action("bookmark", obj, rv)
    raise WatchError(f"unknown watch event type {etype!r}")


class Reflector:
    def __init__(
        self,
        client: KubeClient,
        rtype: ResourceType,
        mirror: Mirror,
        *,
        watch_timeout: int = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.client = client
        self.rtype = rtype
        self.mirror = mirror
        self.watch_timeout = watch_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.page_size = page_size
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self.synced = trio.Event()

    def statistics(self) -> dict[str, Any]:
        return {
            "kind": self.rtype.kind,
            "resourceVersion": self.resource_version,
            "lists": self.lists,
            "watches": self.watches,
        }

    async def list_all(self) -> tuple[list[dict[str, Any]], str]:
        """Every object (all pages) and the list's resourceVersion. Gone if a continue token
        expired mid-way: the caller restarts the list."""
        items: list[dict[str, Any]] = []
        cont: str | None = None
        path = self.rtype.collection_path()
        for _ in range(MAX_PAGES):
            page = await self.client.request(
                "GET", with_query(path, {"limit": self.page_size, "continue": cont})
            )
            raw_items = page.get("items") or []
            if not isinstance(raw_items, list):
                raise KubeError(f"list {path}: 'items' is not a list")
            for item in raw_items:
                if isinstance(item, dict):
                    # List items carry no apiVersion/kind; the type is the list's.
                    item.setdefault("apiVersion", self.rtype.api_version)
                    item.setdefault("kind", self.rtype.kind)
                    items.append(item)
            meta = page.get("metadata") if isinstance(page.get("metadata"), dict) else {}
            assert isinstance(meta, dict)
            cont = meta.get("continue") or None
            if cont is None:
                rv = meta.get("resourceVersion")
                if not isinstance(rv, str) or not rv:
                    raise KubeError(f"list {path}: no metadata.resourceVersion")
                return items, rv
        raise KubeError(f"list {path}: more than {MAX_PAGES} pages")

    async def relist(self) -> None:
        items, rv = await self.list_all()
        await self.mirror.resync(self.rtype, items)
        self.resource_version = rv
        self.lists += 1
        log.info("kube.list.complete", kind=self.rtype.kind, objects=len(items), rv=rv)
        self.synced.set()

    async def watch_once(self) -> None:
        """One watch request from `resource_version` until the server ends it."""
        path = with_query(
            self.rtype.collection_path(),
            {
                "watch": True,
                "resourceVersion": self.resource_version,
                "allowWatchBookmarks": True,
                "timeoutSeconds": self.watch_timeout,
            },
        )
        self.watches += 1
        # A server ends the watch at timeoutSeconds; silence well past it is a dead connection.
        async with self.client.watch(path, idle=self.watch_timeout + 30) as events:
            async for event in events:
                action = next_action(event)
                if action.op == "relist":
                    raise Gone("GET", path, 410, "Expired", str(action.obj.get("message")))
                obj = dict(action.obj)
                obj.setdefault("apiVersion", self.rtype.api_version)
                obj.setdefault("kind", self.rtype.kind)
                if action.op == "upsert":
                    await self.mirror.upsert(self.rtype, obj)
                elif action.op == "remove":
                    await self.mirror.remove(self.rtype, obj)
                if action.resource_version:
                    self.resource_version = action.resource_version

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List+watch forever; `started()` after the first complete list was mirrored."""
        backoff = self.backoff_initial
        started = self.resource_version is not None
        if started:
            task_status.started()
        while True:
            try:
                if self.resource_version is None:
                    await self.relist()
                    if not started:
                        started = True
                        task_status.started()
                await self.watch_once()
                backoff = self.backoff_initial
            except Gone as exc:
                log.info("kube.watch.gone", kind=self.rtype.kind, reason=str(exc))
                self.resource_version = None
                backoff = self.backoff_initial
            except (KubeError, StoreError) as exc:
                log.warning(
                    "kube.watch.failed",
                    kind=self.rtype.kind,
                    error=str(exc),
                    retry_in=round(backoff, 3),
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
