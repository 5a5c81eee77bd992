"""The HTTP/1.1 proxy: serve client connections, route each request, forward or answer it.

One `HttpProxy` serves many client connections (`await proxy.serve(stream, port=…)`), each a
keep-alive loop: request head (`downstream.py`) → `nodeagent.routing.route_http()` → a local answer
(no route, redirect, direct response, fault abort) or a forward: the upstream head
(`headers.py`), the attempts with picks, breaker and retries (`attempt.py`), the response
streamed back or spliced after an Upgrade (`respond.py`), a mirrored copy (`mirror.py`).

Memory stays bounded: headers by `Limits.max_header_bytes` (→ 431), bodies move chunk by chunk.
Every request ends with one `RequestLog` (`log.py`: to the `on_request` hook and the log),
carrying Envoy's response flags (`flags.py`). With a `tracer`, each request gets a CLIENT span
whose context replaces the tracing headers upstream (docs/observability.md).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from contextvars import Token

import h11
import trio

from nodeagent.balance import PickContext, Registry
from nodeagent.http import flags
from nodeagent.http.attempt import AttemptOutcome, Attempts
from nodeagent.http.bridge import Bridge
from nodeagent.http.downstream import (
    REASONS,
    Downstream,
    Drain,
    RequestBody,
    answer_head_timeout,
    answer_if_unanswered,
    answer_locally,
    read_request,
)
from nodeagent.http.errors import DownstreamError, DownstreamProtocolError
from nodeagent.http.guard import Guard
from nodeagent.http.guarded import guard_request, local_address
from nodeagent.http.headers import (
    decode,
    is_upgrade,
    joined,
    new_request_id,
    upstream_head,
)
from nodeagent.http.limits import Limits
from nodeagent.http.log import RequestLog, RequestRecorder, entry_for, log, start_span
from nodeagent.http.mirror import mirror
from nodeagent.http.pool import ConnectionPool, Connector
from nodeagent.http.respond import stream_response
from nodeagent.routing import (
    DirectResponse,
    HttpRequest,
    RouteDecision,
    RouteDestination,
    Source,
    route_http,
)
from nodeagent.snapshot.snapshot import Snapshot
from nodeagent.telemetry.tracing import CURRENT_TRACE, TraceContext, Tracer

SourceFor = Source | Callable[[HttpRequest], Source | None]
_conn_ids = itertools.count(1)


def _peer_of(client: trio.abc.Stream, fallback: str | None) -> str:
    """The client's "ip:port" for the access log (a TLS or test stream: `fallback`, the ip)."""
    if isinstance(client, trio.SocketStream):
        try:
            peer = client.socket.getpeername()
            return f"{peer[0]}:{peer[1]}"
        except OSError:
            pass
    return fallback or ""


class HttpProxy:
    """Routes and forwards HTTP/1.1 requests; one instance per source (pod or gateway).

    `snapshot` returns the current Snapshot (read once per request); `source` is the caller, or a
    function of the request (a gateway picks its Gateway by Host), None meaning 404. `connector`
    opens a stream to an endpoint: `await connector(endpoint, service_port)`; `registry` holds the
    clusters' balancers and circuit breakers (shared by every proxy of the agent). `on_request`
    is called once per completed request; `access_logged` says it writes the access-log line, so
    the proxy's own `request.complete` line drops to debug (one line per request, not two).
    `guard` (the ingress gateway's authentication and authorization, `guard.py`) sees every
    request before it is routed. `bridge` forwards a request whose destination port speaks
    HTTP/2 (`bridge.py`).
    """

    def __init__(
        self,
        *,
        snapshot: Callable[[], Snapshot],
        source: SourceFor,
        connector: Connector,
        registry: Registry,
        on_request: Callable[[RequestLog], None] | None = None,
        limits: Limits | None = None,
        rand: Callable[[], float] = random.random,
        name: str = "http",
        tracer: Tracer | None = None,
        access_logged: bool = False,
        guard: Guard | None = None,
        bridge: Bridge | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._guard = guard
        self._bridge = bridge
        self.registry = registry
        self._tracer = tracer
        self._source = source
        self.limits = limits or Limits()
        self._rand = rand
        self.name = name
        self.pool = ConnectionPool(
            connector,
            max_idle_per_endpoint=self.limits.max_idle_per_endpoint,
            connect_timeout=self.limits.connect_timeout,
            max_header_bytes=self.limits.max_header_bytes,
        )
        self._attempts = Attempts(self.pool, self.limits)
        self._recorder = RequestRecorder(name, on_request, quiet=access_logged)
        self._stats = self._recorder.stats
        self._drain = Drain()

    def drain(self) -> None:
        """The agent drains (a graceful restart): from now on every response says
        `connection: close` and ends its connection, so keep-alive clients reconnect (to the
        agent that took over) instead of staying on this one until the drain deadline."""
        self._drain.on = True

    def statistics(self) -> dict[str, int]:
        return {
            **self._stats,
            "pool_idle": self.pool.idle_count(),
            "pool_connects": self.pool.stats.connects,
            "pool_reuses": self.pool.stats.reuses,
        }

    async def aclose(self) -> None:
        await self.pool.aclose()

    # -- one client connection ---------------------------------------------------------------

    async def serve(
        self,
        client: trio.abc.Stream,
        *,
        port: int = 80,
        host: str | None = None,
        client_address: str | None = None,
    ) -> None:
        """Serve one client connection until it closes (keep-alive), then close it.

        `port` is the port the client addressed (matches on `port`), `host` the service host the
        connection was addressed to (None: route by the Host header), `client_address` goes
        into x-forwarded-for.
        """
        down = Downstream(client, self.limits, self._drain)
        down.address = _peer_of(client, client_address)
        conn_id = next(_conn_ids)
        self._stats["connections"] += 1
        try:
            # The connection's background tasks: mirrored copies, the client watch of attempts.
            async with trio.open_nursery() as mirrors:
                down.tasks = mirrors
                await self._serve_loop(down, port, host, client_address, conn_id, mirrors)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _serve_loop(
        self,
        down: Downstream,
        port: int,
        host: str | None,
        client_address: str | None,
        conn_id: int,
        mirrors: trio.Nursery,
    ) -> None:
        try:
            with down.head_timer:  # the head timeouts (`Downstream.read_head`)
                while True:
                    received_before = down.received
                    event = await read_request(down, self.limits, self._recorder, conn_id)
                    if not isinstance(event, h11.Request):
                        return  # closed, malformed (answered), or idle
                    keep = await self._handle(
                        down, event, port, host, client_address, conn_id, mirrors, received_before
                    )
                    if not keep:
                        return
                    down.conn.start_next_cycle()
            if down.head_timer.cancelled_caught and down.head_started:
                await answer_head_timeout(down, self._recorder, conn_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError, DownstreamError):
            pass

    # -- one request -------------------------------------------------------------------------

    async def _handle(
        self,
        down: Downstream,
        req: h11.Request,
        port: int,
        host: str | None,
        client_address: str | None,
        conn_id: int,
        mirrors: trio.Nursery,
        received_before: int,
    ) -> bool:
        started = trio.current_time()
        # The headers are decoded once, here (h11 already lower-cased the names).
        headers = decode(list(req.headers))
        entry = entry_for(req, conn_id)
        entry.downstream_address = down.address
        target = entry.path
        authority = entry.authority
        if target.startswith(("http://", "https://")):  # absolute-form (a forward proxy request)
            rest = target.split("://", 1)[1]
            authority, slash, path = rest.partition("/")
            target = slash + path if slash else "/"
        if not entry.request_id:
            entry.request_id = new_request_id()
        request = HttpRequest.from_target(
            entry.method,
            authority,
            target,
            joined(headers),
            port=port,
            host=host,
            scheme=down.scheme,
        )
        token: Token[TraceContext | None] | None = None
        if self._tracer is not None:
            token = start_span(self._tracer, req, entry, request)
        try:
            refusal = None
            if self._guard is not None:
                request, headers, refusal = await self._check(down, request, headers, entry, port)
            source = self._source(request) if callable(self._source) else self._source
            try:
                if refusal is not None:
                    decision = refusal
                elif source is not None:
                    decision = route_http(self._snapshot(), source, request, rand=self._rand)
                else:
                    decision = RouteDecision(kind="no_route")
            except Exception as exc:  # a stored document the validator let through; not fatal
                log.error("request.route_failed", path=entry.path, error=repr(exc))
                decision = RouteDecision(
                    kind="direct", direct=DirectResponse(500, b"routing failed")
                )
            entry.route_name = decision.route_name
            keep = False
            # Stream idle timeout: every byte either way pushes the deadline (`down.touch`).
            idle = trio.CancelScope(deadline=started + self.limits.stream_idle_timeout)
            down.idle = idle
            try:
                with idle:
                    keep = await self._execute(
                        down,
                        request,
                        headers,
                        decision,
                        entry,
                        client_address,
                        mirrors,
                        source_ns=source.namespace if source is not None else None,
                    )
            finally:
                down.idle = None
            if idle.cancelled_caught:
                keep = False
                entry.flags.append(flags.STREAM_IDLE_TIMEOUT)
                # Nothing sent yet: 408, as Envoy.
                await answer_if_unanswered(down, entry, 408, b"stream timeout")
        except DownstreamProtocolError as exc:
            # A malformed body: the client hears why (never a silent close), nothing more of
            # it goes upstream (the attempt's connection was discarded).
            entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
            keep = False
            reason = REASONS.get(exc.status, "Bad Request")
            await answer_if_unanswered(down, entry, exc.status, reason.encode())
        except DownstreamError:
            entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            keep = False
        finally:
            if token is not None:
                CURRENT_TRACE.reset(token)
        entry.bytes_received = down.received - received_before
        self._recorder.finish(entry, started)
        # After an Upgrade or CONNECT request the framing checks stopped: never read another
        # request on this connection.
        return keep and not down.framing.passthrough

    async def _check(
        self,
        down: Downstream,
        request: HttpRequest,
        headers: list[tuple[str, str]],
        entry: RequestLog,
        port: int,
    ) -> tuple[HttpRequest, list[tuple[str, str]], RouteDecision | None]:
        """The guard's verdict (authentication, L7 authorization) before routing: a refusal
        is a direct answer (flag UAEX); an allowed request goes on with authentication's
        header and query changes (routes may match the claims it copied to headers)."""
        assert self._guard is not None
        return await guard_request(
            self._guard,
            request,
            headers,
            entry,
            port=port,
            source_ip=down.address.rpartition(":")[0],
            destination_ip=local_address(down.stream),
        )

    async def _execute(
        self,
        down: Downstream,
        request: HttpRequest,
        headers: list[tuple[str, str]],
        decision: RouteDecision,
        entry: RequestLog,
        client_address: str | None,
        mirrors: trio.Nursery,
        *,
        source_ns: str | None = None,
    ) -> bool:
        if decision.kind == "route" and decision.fault.delay > 0:
            entry.flags.append(flags.DELAY_INJECTED)
            await trio.sleep(decision.fault.delay)
        if decision.kind == "no_route":
            entry.flags.append(flags.NO_ROUTE)
            return await answer_locally(down, entry, 404, b"")
        if decision.kind == "redirect" and decision.redirect is not None:
            return await answer_locally(
                down,
                entry,
                decision.redirect.status,
                b"",
                extra=[("location", decision.redirect.location)],
                response_headers=decision.response_headers,
            )
        if decision.kind == "direct" and decision.direct is not None:
            return await answer_locally(
                down,
                entry,
                decision.direct.status,
                decision.direct.body,
                response_headers=decision.response_headers,
            )
        dest = decision.chosen
        if dest is not None and dest.error is None and dest.service is not None:
            # Known before any fault applies: an aborted request still names its destination
            # service in metrics and logs, as Istio's do.
            entry.upstream_cluster = dest.name
        if decision.fault.abort_status is not None:
            entry.flags.append(flags.FAULT_INJECTED)
            return await answer_locally(
                down, entry, decision.fault.abort_status, b"fault filter abort"
            )
        if dest is None or dest.error is not None or dest.service is None or dest.port is None:
            entry.upstream_cluster = None
            entry.flags.append(flags.NO_CLUSTER)
            return await answer_locally(down, entry, 503, b"no cluster for the route's destination")
        return await self._forward(
            down, request, headers, decision, dest, entry, client_address, mirrors, source_ns
        )

    async def _forward(
        self,
        down: Downstream,
        request: HttpRequest,
        headers: list[tuple[str, str]],
        decision: RouteDecision,
        dest: RouteDestination,
        entry: RequestLog,
        client_address: str | None,
        mirrors: trio.Nursery,
        source_ns: str | None,
    ) -> bool:
        assert dest.service is not None
        assert dest.port is not None
        if self._bridge is not None and self._bridge.takes(dest):
            return await self._bridge.forward(
                down, request, headers, decision, dest, entry, client_address, source_ns
            )
        snapshot = self._snapshot()
        cluster = self.registry.picker_for(
            snapshot, dest.service, dest.subset, dest.port, from_namespace=source_ns or None
        )
        upgrade = is_upgrade(request)
        head = upstream_head(
            request,
            headers,
            decision,
            request_id=entry.request_id,
            trace_headers=entry.trace_headers,
            client_address=client_address,
            upgrade=upgrade,
        )
        body = RequestBody(
            down, limit=self.limits.retry_buffer_bytes, expects_body=not down.body_done()
        )
        ctx = PickContext(headers=request.headers, source_ip=client_address, path=request.target)
        result = await self._attempts.run(
            cluster, ctx, head, body, decision, entry, service_port=dest.port, upgrade=upgrade
        )
        if not isinstance(result, AttemptOutcome):
            return await answer_locally(down, entry, result.status, result.body, close=result.close)
        assert result.up is not None
        assert result.response is not None
        keep = await stream_response(
            self.pool, down, result.up, result.response, request, decision, entry, upgrade=upgrade
        )
        shadow = decision.mirror
        if shadow is not None and body.complete and body.replayable:
            mirrors.start_soon(self._mirror, snapshot, shadow, head, list(body.chunks))
        return keep

    async def _mirror(
        self, snapshot: Snapshot, dest: RouteDestination, head: h11.Request, chunks: list[bytes]
    ) -> None:
        sent = None
        with trio.move_on_after(self.limits.mirror_timeout):
            sent = await mirror(self.pool, self.registry, snapshot, dest, head, chunks)
        if sent is not False:  # sent, or timed out after sending
            self._stats["mirrored"] += 1
