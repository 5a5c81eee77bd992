"""The ingress gateway: serves the servers of Gateway resources that select this gateway.

Every served port (`servers.py`: HTTP, HTTPS terminated here, TLS passed through) is listened
on, on the node. A plain port's request is matched to a server by Host; a TLS port's connection
first picks its server by SNI (`tls_accept.py`), and its requests must then name one of that
server's hosts (else 404, as Envoy answers). Requests are routed with the VirtualServices bound
to the server's Gateway (`gateways: [name]`) and forwarded through the injected connector like
any mesh request. Listeners follow the snapshot: a port that appears is bound, one that
disappears is closed; connections read the current snapshot, so route, host and certificate
changes need no rebind. An injected `guard` (authentication and L7 authorization for the
gateway's workload) sees every request before it is routed.

HTTP/2: a TLS server offers ALPN `h2` then `http/1.1` (Envoy's order); a connection that
negotiated `h2`, or a plain port's connection that opens with the HTTP/2 preface (h2c prior
knowledge), is served by the HTTP/2 proxy (`nodeagent.http2`): the same routing and guard, each
request's upstream in the codec its destination port declares (`http2.selection`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import trio

from nodeagent.balance import Registry
from nodeagent.gateway.clienthello import ClientHelloError
from nodeagent.gateway.credentials import CredentialSource
from nodeagent.gateway.passthrough import pass_through
from nodeagent.gateway.servers import (
    ServerBinding,
    host_matches,
    is_tls_port,
    server_for_host,
    server_for_sni,
    servers_by_port,
)
from nodeagent.gateway.tls_accept import (
    HANDSHAKE_TIMEOUT,
    TlsRefused,
    peek_client_hello,
    terminate,
)
from nodeagent.http import Connector, HttpProxy, Limits, RequestLog
from nodeagent.http.guard import Guard
from nodeagent.http2.proxy import H2Proxy
from nodeagent.http2.sniff import classify_declared, sniff
from nodeagent.inpod.listeners import listen_beside
from nodeagent.log import get_logger
from nodeagent.routing import HttpRequest, Source
from nodeagent.snapshot.snapshot import Snapshot
from nodeagent.telemetry.tracing import Tracer
from nodeagent.tunnel import TlsStream

log = get_logger("gateway")

DEFAULT_LABELS: Mapping[str, str] = MappingProxyType({"istio": "ingressgateway"})
# A plain port's connection: how long its first bytes may take to say h2 (prior knowledge) or
# HTTP/1.1 (then HTTP/1.1, whose own head timeouts apply).
H2C_SNIFF_TIMEOUT = 10.0

# The server a TLS connection's SNI chose, for its requests' `source_for` (set in the
# connection's task, which runs the HTTP proxy's keep-alive loop itself).
_CONNECTION_SERVER: ContextVar[ServerBinding | None] = ContextVar(
    "gateway_connection_server", default=None
)

__all__ = [
    "DEFAULT_LABELS",
    "GatewayError",
    "IngressGateway",
    "ServerBinding",
    "host_matches",
    "servers_by_port",
]


class GatewayError(Exception):
    """A gateway listener could not be set up (names the port and why)."""


@dataclass(slots=True)
class _Listener:
    scope: trio.CancelScope
    bound: int
    listeners: list[trio.SocketListener]
    done: trio.Event = field(default_factory=trio.Event)


class IngressGateway:
    """Listens for the selected Gateways' servers and forwards into the mesh.

    `snapshot()` gives the current Snapshot; `wait_change()` returns after the next snapshot
    swap (e.g. `SnapshotSync.wait_swap`). `port_map(gateway_port) -> port to bind` lets tests
    and sandboxes bind elsewhere (0 = any free port; `listening()` says which). `credentials`
    loads the TLS servers' certificates (default: file paths only, no credentialName source).
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
        credentials: CredentialSource | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._connector = connector
        self._registry = registry
        self.credentials = credentials if credentials is not None else CredentialSource()
        self._servers_of: Snapshot | None = None
        self._servers: dict[int, tuple[ServerBinding, ...]] = {}
        self._tls_stats = {"tls_accepted": 0, "tls_refused": 0, "passthrough": 0}
        self._wait_change = wait_change
        self._labels = labels
        self._bind_host = bind_host
        self._port_map = port_map or (lambda p: p)
        self._listeners: dict[int, _Listener] = {}
        self._accepting = True
        self.open_connections = 0  # accepted and not yet closed (a draining agent waits)
        self.bind_errors: dict[int, str] = {}
        self.http2 = H2Proxy(
            snapshot=snapshot,
            source=self.source_for,
            connector=connector,
            registry=registry,
            on_request=on_request,
            limits=limits,
            name="gateway-h2",
            tracer=tracer,
            access_logged=access_logged,
            guard=guard,
        )
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
            bridge=self.http2.http1_bridge,  # an HTTP/1.1 client's request to an HTTP/2 port
        )

    def listening(self) -> dict[int, int]:
        """Gateway port → the local port actually bound."""
        return {p: li.bound for p, li in self._listeners.items()}

    def statistics(self) -> dict[str, Any]:
        return {
            "listening": self.listening(),
            "bind_errors": dict(self.bind_errors),
            "credentials": self.credentials.statistics(),
            **self._tls_stats,
            **self.proxy.statistics(),
            "http2": self.http2.statistics(),
        }

    def servers(self) -> dict[int, tuple[ServerBinding, ...]]:
        """The served servers per port of the current snapshot (computed once per snapshot)."""
        snap = self._snapshot()
        if snap is not self._servers_of:
            self._servers = servers_by_port(snap, self._labels)
            self._servers_of = snap
        return self._servers

    def source_for(self, request: HttpRequest) -> Source | None:
        """The Gateway a request reaches: on a TLS connection, the server its SNI chose if the
        request's host is one of its hosts; otherwise the first server of the port whose hosts
        match."""
        chosen = _CONNECTION_SERVER.get()
        if chosen is not None:
            host = request.authority_host
            server = chosen if any(host_matches(h, host) for h in chosen.hosts) else None
        else:
            server = server_for_host(self.servers().get(request.port, ()), request.authority_host)
        if server is None:
            return None
        return Source(
            namespace=server.namespace,
            labels=self._labels,
            gateway=server.gateway,
            require_tls=server.https_redirect,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the current Gateways' ports, report started, then follow snapshot changes.

        A port that cannot be bound at start is an error (fail fast); later, it is logged and
        retried at the next change.
        """
        # Bind the first set before any task exists, so a failure is a plain GatewayError.
        initial = await self._bind(set(self.servers()), True)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.http2.run)  # its pooled upstream connections
                for port, listeners in initial:
                    self._start(nursery, port, listeners)
                task_status.started()
                while True:
                    await self._wait_change()
                    await self._reconcile(nursery)
        finally:
            with trio.CancelScope(shield=True):
                await self.proxy.aclose()
                await self.http2.aclose()

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        current = self.servers()
        wanted = set(current)
        self.credentials.forget_unused(
            {b.tls for bindings in current.values() for b in bindings if b.tls is not None}
        )
        for port in sorted(set(self._listeners) - wanted):
            listener = self._listeners.pop(port)
            listener.scope.cancel()
            await listener.done.wait()
            log.info("gateway.unbound", port=port)
        if not self._accepting:
            return
        for port, listeners in await self._bind(wanted - set(self._listeners), False):
            self._start(nursery, port, listeners)

    async def _bind(
        self, ports: set[int], strict: bool
    ) -> list[tuple[int, list[trio.SocketListener]]]:
        out: list[tuple[int, list[trio.SocketListener]]] = []
        for port in sorted(ports):
            local = self._port_map(port)
            try:
                out.append((port, [self._listen(local)]))
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

    def _listen(self, port: int) -> trio.SocketListener:
        """SO_REUSEPORT, as the pods' listeners: a restarted agent's gateway binds beside the
        draining one, which keeps accepting until `stop_accepting` (no connection refused)."""
        family = socket.AF_INET6 if ":" in self._bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            listen_beside(sock, self._bind_host, port)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    def stop_accepting(self) -> None:
        """Close every listener (a successor serves new connections); open connections go on
        until they end or the agent stops, their clients told to reconnect (HTTP/1.1:
        `connection: close` on the next response; HTTP/2: a graceful GOAWAY). No port is bound
        after this."""
        self._accepting = False
        self.proxy.drain()
        self.http2.drain()
        for entry in self._listeners.values():
            for listener in entry.listeners:
                listener.socket.close()

    def _start(
        self, nursery: trio.Nursery, port: int, listeners: list[trio.SocketListener]
    ) -> None:
        bound = listeners[0].socket.getsockname()[1]
        entry = _Listener(scope=trio.CancelScope(), bound=bound, listeners=listeners)
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
            bindings = self.servers().get(port, ())
            if is_tls_port(bindings):
                await self._serve_tls(stream, port, bindings, peer)
            elif await sniff(stream.socket, H2C_SNIFF_TIMEOUT, classify_declared) == "h2":
                await self.http2.serve(stream, port=port, client_address=peer)
            else:
                await self.proxy.serve(stream, port=port, client_address=peer)

        async def counted(stream: trio.SocketStream) -> None:
            self.open_connections += 1
            try:
                await handle(stream)
            finally:
                self.open_connections -= 1

        async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:
                    return  # `stop_accepting`: the open connections go on in `nursery`
                except OSError as exc:  # EMFILE and friends: back off rather than spin
                    log.warning("gateway.accept_failed", port=port, error=str(exc))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(counted, stream)

        try:
            with entry.scope:
                async with trio.open_nursery() as nursery:
                    for listener in listeners:
                        nursery.start_soon(accept, listener, nursery)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            entry.done.set()

    async def _serve_tls(
        self,
        stream: trio.SocketStream,
        port: int,
        bindings: tuple[ServerBinding, ...],
        peer: str | None,
    ) -> None:
        """One connection of a TLS port: SNI → server → pass through, or terminate and serve
        HTTP/2 (ALPN h2) or HTTP/1.1 inside."""
        sni: str | None = None
        binding: ServerBinding | None = None
        tls: TlsStream | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                hello = await peek_client_hello(stream.socket)
                sni = hello.server_name
                binding = server_for_sni(bindings, sni)
                if binding is None:
                    raise TlsRefused("no_server", f"no server on port {port} for this SNI")
                if binding.passthrough and sni is None:
                    raise TlsRefused("no_sni", "PASSTHROUGH routes on SNI; none was sent")
                if not binding.passthrough:
                    tls = await terminate(stream, binding, self.credentials)
        except (TlsRefused, ClientHelloError, trio.TooSlowError) as exc:
            self._refused(exc, port, peer, sni, binding)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()
            return
        if tls is None:
            assert sni is not None
            self._tls_stats["passthrough"] += 1
            await pass_through(
                stream,
                binding=binding,
                sni=sni,
                port=port,
                peer=peer,
                snapshot=self._snapshot,
                registry=self._registry,
                connector=self._connector,
                labels=dict(self._labels),
            )
            return
        self._tls_stats["tls_accepted"] += 1
        log.debug(
            "gateway.tls_accepted",
            port=port,
            peer=peer,
            sni=sni,
            server=binding.name,
            version=tls.ssl.version(),
        )
        token = _CONNECTION_SERVER.set(binding)
        try:
            if tls.ssl.selected_alpn_protocol() == "h2":
                await self.http2.serve(tls, port=port, client_address=peer)
            else:
                await self.proxy.serve(tls, port=port, client_address=peer)
        finally:
            _CONNECTION_SERVER.reset(token)

    def _refused(
        self,
        exc: Exception,
        port: int,
        peer: str | None,
        sni: str | None,
        binding: ServerBinding | None,
    ) -> None:
        if isinstance(exc, TlsRefused):
            reason = exc.reason
        elif isinstance(exc, trio.TooSlowError):
            reason = "timeout"
        else:
            reason = "not_tls"
        self._tls_stats["tls_refused"] += 1
        log.info(
            "gateway.tls_refused",
            port=port,
            peer=peer,
            sni=sni,
            server=binding.name if binding else None,
            reason=reason,
            error=str(exc) or reason,
        )
