"""The ingress gateway: serves the HTTP servers of Gateway resources that select this gateway.

A Gateway whose `selector` matches the gateway's labels (by default `istio: ingressgateway`)
contributes its servers; every HTTP server port is listened on (plain TCP, on the node). A request
is matched to a server of its port by Host (`hosts`: `*`, `*.suffix`, exact; a `ns/` prefix is
accepted and its namespace not enforced), routed with the VirtualServices bound to that Gateway
(`gateways: [name]`), and forwarded through the injected connector like any mesh request.
Listeners follow the snapshot: a port that appears is bound, one that disappears is closed;
requests read the current snapshot, so route and host changes need no rebind. An injected
`guard` (authentication and L7 authorization for the gateway's workload) sees every request
before it is routed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import trio

from nodeagent.balance import Registry
from nodeagent.http import Connector, HttpProxy, Limits, RequestLog
from nodeagent.http.guard import Guard
from nodeagent.log import get_logger
from nodeagent.routing import HttpRequest, Source
from nodeagent.snapshot import hosts
from nodeagent.snapshot.snapshot import Snapshot
from nodeagent.telemetry.tracing import Tracer

log = get_logger("gateway")

DEFAULT_LABELS: Mapping[str, str] = MappingProxyType({"istio": "ingressgateway"})
HTTP_PROTOCOLS = frozenset({"HTTP"})


class GatewayError(Exception):
    """A gateway listener could not be set up (names the port and why)."""


@dataclass(frozen=True, slots=True)
class ServerBinding:
    """One HTTP server of one Gateway on a port."""

    gateway: str  # ns/name
    namespace: str
    hosts: tuple[str, ...]


def host_matches(pattern: str, host: str) -> bool:
    """A Gateway server host (`*`, `*.example.com`, `ns/host`) against a request's host."""
    pattern = hosts.normalize(pattern.rpartition("/")[2])
    host = hosts.normalize(host)
    if pattern == "*":
        return True
    if hosts.is_wildcard(pattern):
        return hosts.wildcard_matches(pattern, host)
    return pattern == host


def servers_by_port(
    snapshot: Snapshot, labels: Mapping[str, str]
) -> dict[int, tuple[ServerBinding, ...]]:
    """The HTTP servers of the Gateways selecting `labels`, per port, in a stable order."""
    out: dict[int, list[ServerBinding]] = {}
    for ref in sorted(snapshot.indexes.gateways):
        gw = snapshot.indexes.gateways[ref]
        if not gw.selector or not hosts.labels_match(gw.selector, labels):
            continue
        for server in gw.servers:
            port: Mapping[str, Any] = server.get("port") or {}
            if str(port.get("protocol", "")).upper() not in HTTP_PROTOCOLS:
                continue
            number = int(port["number"])
            hs = tuple(str(h) for h in server.get("hosts") or ("*",))
            out.setdefault(number, []).append(ServerBinding(gw.ref, gw.namespace, hs))
    return {p: tuple(v) for p, v in out.items()}


@dataclass(slots=True)
class _Listener:
    scope: trio.CancelScope
    bound: int
    done: trio.Event = field(default_factory=trio.Event)


class IngressGateway:
    """Listens for the selected Gateways' HTTP servers and forwards into the mesh.

    `snapshot()` gives the current Snapshot; `wait_change()` returns after the next snapshot
    swap (e.g. `SnapshotSync.wait_swap`). `port_map(gateway_port) -> port to bind` lets tests
    and sandboxes bind elsewhere (0 = any free port; `listening()` says which).
    """

    def __init__(
        self,
        *,
        snapshot: Callable[[], Snapshot],
        wait_change: Callable[[], Awaitable[object]],
        connector: Connector,
        registry: Registry,
        labels: Mapping[str, str] = DEFAULT_LABELS,
        bind_host: str = "0.0.0.0",
        port_map: Callable[[int], int] | None = None,
        on_request: Callable[[RequestLog], None] | None = None,
        limits: Limits | None = None,
        tracer: Tracer | None = None,
        access_logged: bool = False,
        guard: Guard | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._wait_change = wait_change
        self._labels = labels
        self._bind_host = bind_host
        self._port_map = port_map or (lambda p: p)
        self._listeners: dict[int, _Listener] = {}
        self.bind_errors: dict[int, str] = {}
        self.proxy = HttpProxy(
            snapshot=snapshot,
            source=self.source_for,
            connector=connector,
            registry=registry,
            on_request=on_request,
            limits=limits,
            name="gateway",
            tracer=tracer,
            access_logged=access_logged,
            guard=guard,
        )

    def listening(self) -> dict[int, int]:
        """Gateway port → the local port actually bound."""
        return {p: li.bound for p, li in self._listeners.items()}

    def statistics(self) -> dict[str, Any]:
        return {
            "listening": self.listening(),
            "bind_errors": dict(self.bind_errors),
            **self.proxy.statistics(),
        }

    def source_for(self, request: HttpRequest) -> Source | None:
        """The Gateway a request reaches: the first server of its port whose hosts match."""
        servers = servers_by_port(self._snapshot(), self._labels).get(request.port, ())
        for server in servers:
            if any(host_matches(h, request.authority_host) for h in server.hosts):
                return Source(
                    namespace=server.namespace, labels=self._labels, gateway=server.gateway
                )
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the current Gateways' ports, report started, then follow snapshot changes.

        A port that cannot be bound at start is an error (fail fast); later, it is logged and
        retried at the next change.
        """
        # Bind the first set before any task exists, so a failure is a plain GatewayError.
        initial = await self._bind(set(servers_by_port(self._snapshot(), self._labels)), True)
        try:
            async with trio.open_nursery() as nursery:
                for port, listeners in initial:
                    self._start(nursery, port, listeners)
                task_status.started()
                while True:
                    await self._wait_change()
                    await self._reconcile(nursery)
        finally:
            with trio.CancelScope(shield=True):
                await self.proxy.aclose()

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        wanted = set(servers_by_port(self._snapshot(), self._labels))
        for port in sorted(set(self._listeners) - wanted):
            listener = self._listeners.pop(port)
            listener.scope.cancel()
            await listener.done.wait()
            log.info("gateway.unbound", port=port)
        for port, listeners in await self._bind(wanted - set(self._listeners), False):
            self._start(nursery, port, listeners)

    async def _bind(
        self, ports: set[int], strict: bool
    ) -> list[tuple[int, list[trio.SocketListener]]]:
        out: list[tuple[int, list[trio.SocketListener]]] = []
        for port in sorted(ports):
            local = self._port_map(port)
            try:
                out.append((port, await trio.open_tcp_listeners(local, host=self._bind_host)))
            except OSError as exc:
                msg = f"bind gateway port {port} ({self._bind_host}:{local}): {exc.strerror or exc}"
                self.bind_errors[port] = msg
                log.error("gateway.bind_failed", port=port, error=msg)
                if strict:
                    for _, listeners in out:
                        for listener in listeners:
                            await listener.aclose()
                    raise GatewayError(msg) from exc
                continue
            self.bind_errors.pop(port, None)
        return out

    def _start(
        self, nursery: trio.Nursery, port: int, listeners: list[trio.SocketListener]
    ) -> None:
        bound = listeners[0].socket.getsockname()[1]
        entry = _Listener(scope=trio.CancelScope(), bound=bound)
        self._listeners[port] = entry
        nursery.start_soon(self._serve_port, port, listeners, entry)
        log.info("gateway.bound", port=port, address=f"{self._bind_host}:{bound}")

    async def _serve_port(
        self, port: int, listeners: list[trio.SocketListener], entry: _Listener
    ) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()[0]
            except OSError:
                peer = None
            await self.proxy.serve(stream, port=port, client_address=peer)

        try:
            with entry.scope:
                await trio.serve_listeners(handle, listeners)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            entry.done.set()
