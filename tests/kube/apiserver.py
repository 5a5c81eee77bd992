"""A local Kubernetes API server double speaking the real list/watch wire format.

What it reproduces (shapes from the Kubernetes API reference, "API Concepts"):
- lists: `{"kind": "<Kind>List", "apiVersion", "metadata": {"resourceVersion", "continue"?},
  "items": [...]}`, paged with `limit`/`continue`; an expired continue token is HTTP 410
  with a `Status` (`reason: Expired`);
- watches: `?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`, a 200
  with `Transfer-Encoding: chunked` and one JSON event `{"type", "object"}` per line, events
  strictly after N; a compacted N is either HTTP 410 or (as real servers do once the stream is
  open) an `ERROR` event carrying a 410 `Status`; `BOOKMARK` events carry only
  `metadata.resourceVersion`;
- single objects: GET, POST (409 AlreadyExists), PUT with optimistic concurrency on
  `metadata.resourceVersion` (409 Conflict), as Lease objects need.

Every request is recorded as (verb, group, resource) so tests can derive the RBAC the code
needs. Serve over TCP (`serve_tcp`) or hand `connect` to KubeClient for in-memory streams.
"""

from __future__ import annotations

import base64
import copy
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
import trio.testing

KINDS = {
    ("", "services"): "Service",
    ("", "pods"): "Pod",
    ("discovery.k8s.io", "endpointslices"): "EndpointSlice",
    ("coordination.k8s.io", "leases"): "Lease",
    ("networking.istio.io", "virtualservices"): "VirtualService",
    ("networking.istio.io", "destinationrules"): "DestinationRule",
    ("networking.istio.io", "gateways"): "Gateway",
    ("networking.istio.io", "serviceentries"): "ServiceEntry",
    ("security.istio.io", "authorizationpolicies"): "AuthorizationPolicy",
    ("security.istio.io", "peerauthentications"): "PeerAuthentication",
    ("security.istio.io", "requestauthentications"): "RequestAuthentication",
    ("mesh.nodeagent.io", "rollouts"): "Rollout",
}


@dataclass(frozen=True, slots=True)
class Target:
    group: str
    version: str
    resource: str
    namespace: str | None
    name: str | None


def parse_path(path: str) -> Target:
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"]:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise KeyError(path)
    namespace = None
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    if len(rest) == 1:
        return Target(group, version, rest[0], namespace, None)
    if len(rest) == 2:
        return Target(group, version, rest[0], namespace, rest[1])
    raise KeyError(path)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(slots=True)
class Change:
    rv: int
    key: tuple[str, str]  # (group, resource)
    type: str
    obj: dict[str, Any]


@dataclass
class FakeApiServer:
    rv: int = 1000
    # (group, resource) → (namespace, name) → object
    objects: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=dict
    )
    history: list[Change] = field(default_factory=list)
    compacted: int = 0  # watches/continues from rv < this get 410
    gone_as_event: bool = True  # 410 as a watch ERROR event (True) or as an HTTP status
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)
    _end_watches: trio.Event = field(default_factory=trio.Event)
    _bookmark: trio.Event = field(default_factory=trio.Event)
    active_watches: int = 0

    # -- test-side mutations --------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _store(
        self, key: tuple[str, str], obj: dict[str, Any], etype: str | None = None
    ) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ident = (meta.get("namespace", ""), meta["name"])
        bucket = self.objects.setdefault(key, {})
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", f"uid-{key[1]}-{ident[0]}-{ident[1]}")
        meta.setdefault("creationTimestamp", "2026-11-24T08:00:00Z")
        if etype is None:
            etype = "MODIFIED" if ident in bucket else "ADDED"
        bucket[ident] = obj
        self.history.append(Change(self.rv, key, etype, copy.deepcopy(obj)))
        self._notify()
        return obj

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (like `kubectl apply`); an event follows."""
        group, _, _version = obj["apiVersion"].rpartition("/")
        key = next(k for k, kind in KINDS.items() if kind == obj["kind"] and k[0] == group)
        return self._store(key, obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        key = next(k for k, v in KINDS.items() if v == kind)
        obj = self.objects[key].pop((namespace, name))
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append(Change(self.rv, key, "DELETED", copy.deepcopy(obj)))
        self._notify()

    def compact(self) -> None:
        """Forget history up to now: older resourceVersions now get 410 Gone."""
        self.compacted = self.rv + 1
        self.history.clear()

    def end_watches(self) -> None:
        """End every open watch response (as the server does at timeoutSeconds)."""
        self._end_watches.set()
        self._end_watches = trio.Event()

    def send_bookmarks(self) -> None:
        self._bookmark.set()
        self._bookmark = trio.Event()

    def verbs(self) -> set[tuple[str, str, str]]:
        return set(self.requests)

    # -- serving ----------------------------------------------------------------------------

    async def serve_tcp(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(port)
            await trio.serve_listeners(self.handle, listeners, handler_nursery=nursery)

    def connector(self, nursery: trio.Nursery) -> Any:
        """A KubeClient connector: each call is a new in-memory connection to this server."""

        async def connect() -> trio.abc.Stream:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(self.handle, server)
            return client

        return connect

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                    continue
                if isinstance(ev, h11.Request):
                    request = ev
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            await self._dispatch(stream, conn, request, bytes(body))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _send_json(
        self, stream: trio.abc.Stream, conn: h11.Connection, code: int, doc: dict[str, Any]
    ) -> None:
        payload = json.dumps(doc).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        await stream.send_all(conn.send(h11.Response(status_code=code, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    async def _dispatch(
        self, stream: trio.abc.Stream, conn: h11.Connection, req: h11.Request, body: bytes
    ) -> None:
        target = req.target.decode()
        self.paths.append(f"{req.method.decode()} {target}")
        path, _, query = target.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        try:
            t = parse_path(path)
        except KeyError:
            await self._send_json(stream, conn, 404, status(404, "NotFound", f"no route {path}"))
            return
        key = (t.group, t.resource)
        method = req.method.decode()
        if key not in KINDS:
            await self._send_json(stream, conn, 404, status(404, "NotFound", "no such resource"))
            return
        if method == "GET" and t.name is None:
            watch = params.get("watch") in ("true", "1")
            self.requests.append(("watch" if watch else "list", t.group, t.resource))
            if watch:
                await self._watch(stream, conn, key, t, params)
            else:
                code, doc = self._list(key, t, params)
                await self._send_json(stream, conn, code, doc)
            return
        verb = {"GET": "get", "POST": "create", "PUT": "update"}.get(method, method.lower())
        self.requests.append((verb, t.group, t.resource))
        code, doc = self._unary(method, key, t, body)
        await self._send_json(stream, conn, code, doc)

    def _items(self, key: tuple[str, str], namespace: str | None) -> list[dict[str, Any]]:
        bucket = self.objects.get(key, {})
        return [bucket[i] for i in sorted(bucket) if namespace is None or i[0] == namespace]

    def _list(
        self, key: tuple[str, str], t: Target, params: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        items = self._items(key, t.namespace)
        rv = self.rv
        offset = 0
        if params.get("continue"):
            token = json.loads(base64.b64decode(params["continue"]))
            rv, offset = token["rv"], token["start"]
            if rv < self.compacted:
                return 410, status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue "
                    "parameter.",
                )
        limit = int(params.get("limit") or 0) or len(items) + 1
        page = items[offset : offset + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if offset + limit < len(items):
            meta["continue"] = base64.b64encode(
                json.dumps({"rv": rv, "start": offset + limit}).encode()
            ).decode()
            meta["remainingItemCount"] = len(items) - offset - limit
        kind = KINDS[key]
        api_version = f"{key[0]}/{t.version}" if key[0] else t.version
        # Items of a list carry no kind/apiVersion, as real list responses.
        stripped = [{k: v for k, v in i.items() if k not in ("kind", "apiVersion")} for i in page]
        return 200, {
            "kind": f"{kind}List",
            "apiVersion": api_version,
            "metadata": meta,
            "items": copy.deepcopy(stripped),
        }

    def _events_after(self, key: tuple[str, str], rv: int) -> Iterator[Change]:
        return (c for c in self.history if c.key == key and c.rv > rv)

    async def _watch(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        key: tuple[str, str],
        t: Target,
        params: dict[str, str],
    ) -> None:
        since = int(params.get("resourceVersion") or 0)
        gone = status(410, "Expired", f"too old resource version: {since} ({self.compacted})")
        if since < self.compacted and not self.gone_as_event:
            await self._send_json(stream, conn, 410, gone)
            return
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")

        async def event(doc: dict[str, Any]) -> None:
            line = json.dumps(doc).encode() + b"\n"
            await stream.send_all(conn.send(h11.Data(data=line)) or b"")

        self.active_watches += 1
        try:
            if since < self.compacted:
                await event({"type": "ERROR", "object": gone})
            else:
                timeout = float(params.get("timeoutSeconds") or 1800)
                with trio.move_on_after(timeout):
                    end = self._end_watches
                    while not end.is_set():
                        for change in list(self._events_after(key, since)):
                            if t.namespace and change.obj["metadata"].get("namespace") != (
                                t.namespace
                            ):
                                continue
                            await event({"type": change.type, "object": change.obj})
                            since = change.rv
                        changed, bookmark = self._changed, self._bookmark
                        async with trio.open_nursery() as waiters:

                            async def wait(ev: trio.Event) -> None:
                                await ev.wait()
                                waiters.cancel_scope.cancel()

                            for ev in (changed, bookmark, end):
                                waiters.start_soon(wait, ev)
                        if bookmark.is_set() and params.get("allowWatchBookmarks") == "true":
                            since = max(since, self.rv)
                            kind = KINDS[key]
                            await event(
                                {
                                    "type": "BOOKMARK",
                                    "object": {
                                        "kind": kind,
                                        "apiVersion": f"{key[0]}/{t.version}"
                                        if key[0]
                                        else t.version,
                                        "metadata": {"resourceVersion": str(self.rv)},
                                    },
                                }
                            )
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        finally:
            self.active_watches -= 1

    def _unary(
        self, method: str, key: tuple[str, str], t: Target, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        bucket = self.objects.setdefault(key, {})
        ns = t.namespace or ""
        if method == "GET":
            obj = bucket.get((ns, t.name or ""))
            if obj is None:
                return 404, status(404, "NotFound", f'{t.resource} "{t.name}" not found')
            return 200, copy.deepcopy(obj)
        doc = json.loads(body)
        name = doc["metadata"]["name"]
        if method == "POST":
            if (ns, name) in bucket:
                return 409, status(409, "AlreadyExists", f'{t.resource} "{name}" already exists')
            doc["metadata"]["namespace"] = ns
            return 201, copy.deepcopy(self._store(key, doc))
        if method == "PUT":
            current = bucket.get((ns, name))
            if current is None:
                return 404, status(404, "NotFound", f'{t.resource} "{name}" not found')
            if doc["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return 409, status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {t.resource} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                )
            doc["metadata"]["namespace"] = ns
            doc["metadata"]["uid"] = current["metadata"]["uid"]
            return 200, copy.deepcopy(self._store(key, doc))
        return 405, status(405, "MethodNotAllowed", method)
