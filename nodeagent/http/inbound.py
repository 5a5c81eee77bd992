"""The destination agent's HTTP/1.1 server: requests that arrived for this pod's HTTP port.

The source agent already routed, retried and injected faults; here each request is only parsed
(the same `downstream.py` codec and `framing.py` smuggling checks as the source), put through
the injected `Guard` (RequestAuthentication, then L7 AuthorizationPolicy: `guard.py`), and
forwarded to the pod's own app port, the connection's original destination. A refusal is
answered here (401 with authentication's body, `403 RBAC: access denied`), flag UAEX and the
deciding policy in `response_code_details`. Every request gets a SERVER span (the child of the
source's CLIENT span through `traceparent`), one `RequestLog` and the per-connection
`on_request` hook (reporter "destination" metrics and the access log).

Upstream connections to the app are kept alive per client connection (`ConnectionPool` with one
idle slot): the app sees one connection per tunnel stream, opened from the client pod's address,
as the L4 relay gives it, and a keep-alive client costs one connect, not one per request.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import h11
import trio

from nodeagent.http import flags
from nodeagent.http.attempt import may_resend
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
from nodeagent.http.guard import Guard, RequestFacts, Verdict
from nodeagent.http.guarded import ask_guard
from nodeagent.http.headers import decode, destination_head, joined
from nodeagent.http.limits import Limits
from nodeagent.http.log import RequestLog, RequestRecorder, entry_for, log
from nodeagent.http.pool import ConnectionPool, UpstreamConnection
from nodeagent.http.respond import stream_response
from nodeagent.routing import HttpRequest, RouteDecision
from nodeagent.snapshot.model import Endpoint
from nodeagent.telemetry.tracing import SpanEndpoint, Tracer, incoming_b3, inject

_conn_ids = itertools.count(1)
_FORWARD = RouteDecision(kind="route")  # no route at the destination: no header operations
_UPSTREAM_FAILURES = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class InboundConnection:
    """One client connection to serve: who it comes from (verified at accept), where the app
    is, and how to reach it."""

    source_ip: str
    source_port: int
    destination_ip: str
    port: int  # the app's port
    source_identity: str | None  # the tunnel peer's SPIFFE id; None for plaintext (15006)
    connect: Callable[[], Awaitable[trio.abc.Stream]]  # a new connection to the app
    on_request: Callable[[RequestLog], None] | None = None  # metrics + access log
    xfcc: str | None = None  # the x-forwarded-client-cert value to set (mTLS only)
    span_name: str = ""  # the SERVER span's name (`<service host>:<port>/*`)

    def facts(
        self, method: str, target: str, host: str, headers: Sequence[tuple[str, str]]
    ) -> RequestFacts:
        """What the guard may read of a request on this connection."""
        return RequestFacts(
            method=method,
            target=target,
            host=host,
            headers=headers,
            port=self.port,
            source_ip=self.source_ip,
            destination_ip=self.destination_ip,
            source_identity=self.source_identity,
            mtls=self.source_identity is not None,
        )


@dataclass(slots=True)
class Totals:
    """One client connection's bytes: `received` from the client, `sent` to it."""

    received: int = 0
    sent: int = 0


class InboundServer:
    """What the destination's HTTP/1.1 and HTTP/2 servers share: the pod's guard, limits,
    tracer and request recorder (its counters are the statistics)."""

    default_name: ClassVar[str] = "inbound"

    def __init__(
        self,
        *,
        guard: Guard,
        limits: Limits | None = None,
        tracer: Tracer | None = None,
        name: str | None = None,
        access_logged: bool = False,
    ) -> None:
        self._guard = guard
        self.limits = limits or Limits()
        self._tracer = tracer
        self._recorder = RequestRecorder(name or self.default_name, None, quiet=access_logged)
        self._set_up()

    def _set_up(self) -> None:
        """The subclass's own state (its drain)."""

    def statistics(self) -> dict[str, int]:
        return dict(self._recorder.stats)

    def _finish(self, entry: RequestLog, started: float, inbound: InboundConnection) -> None:
        """The request's log line, then the connection's metrics and access-log hook."""
        self._recorder.finish(entry, started)
        if inbound.on_request is not None:
            try:
                inbound.on_request(entry)
            except Exception as exc:  # a broken metrics hook must not break traffic
                log.warning("request.hook_failed", error=repr(exc))


class InboundHttp(InboundServer):
    """Serves the HTTP connections of one pod's HTTP ports (destination mode)."""

    def _set_up(self) -> None:
        self._drain = Drain()

    def drain(self) -> None:
        """The agent drains: responses say `connection: close` from now on (`HttpProxy.drain`)."""
        self._drain.on = True

    async def serve(
        self, client: trio.abc.Stream, inbound: InboundConnection, totals: Totals | None = None
    ) -> None:
        """Serve `client` until it closes (keep-alive); closes it and its app connection.
        `totals` counts the connection's bytes either way (its TCP metrics)."""
        totals = totals if totals is not None else Totals()
        limits = self.limits
        down = Downstream(client, limits, self._drain)
        down.address = f"{inbound.source_ip}:{inbound.source_port}"
        conn_id = next(_conn_ids)
        self._recorder.stats["connections"] += 1

        async def connect(_endpoint: Endpoint, _port: int) -> trio.abc.Stream:
            return await inbound.connect()

        pool = ConnectionPool(
            connect,
            max_idle_per_endpoint=1,
            connect_timeout=limits.connect_timeout,
            max_header_bytes=limits.max_header_bytes,
        )
        try:
            async with trio.open_nursery() as tasks:
                down.tasks = tasks
                await self._serve_loop(down, pool, inbound, conn_id, totals)
                tasks.cancel_scope.cancel()
        finally:
            totals.received = down.received
            with trio.CancelScope(shield=True):
                await pool.aclose()
                await client.aclose()

    async def _serve_loop(
        self,
        down: Downstream,
        pool: ConnectionPool,
        inbound: InboundConnection,
        conn_id: int,
        totals: Totals,
    ) -> None:
        try:
            with down.head_timer:
                while True:
                    received_before = down.received
                    event = await read_request(down, self.limits, self._recorder, conn_id)
                    if not isinstance(event, h11.Request):
                        return
                    started = trio.current_time()
                    entry = entry_for(event, conn_id)
                    keep = await self._handle(down, pool, inbound, event, entry, started)
                    entry.bytes_received = down.received - received_before
                    totals.sent += entry.bytes_sent
                    self._finish(entry, started, inbound)
                    if not keep or down.framing.passthrough:
                        return
                    down.conn.start_next_cycle()
            if down.head_timer.cancelled_caught and down.head_started:
                await answer_head_timeout(down, self._recorder, conn_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError, DownstreamError):
            pass

    async def _handle(
        self,
        down: Downstream,
        pool: ConnectionPool,
        inbound: InboundConnection,
        req: h11.Request,
        entry: RequestLog,
        started: float,
    ) -> bool:
        headers = decode(list(req.headers))
        entry.downstream_address = down.address
        entry.upstream = f"{inbound.destination_ip}:{inbound.port}"
        entry.upstream_cluster = f"inbound|{inbound.port}||"
        trace_headers: list[tuple[str, str]] = []
        if self._tracer is not None:
            trace_headers = self._start_span(req, entry, inbound)
        keep = False
        idle = trio.CancelScope(deadline=started + self.limits.stream_idle_timeout)
        down.idle = idle
        try:
            with idle:
                facts = inbound.facts(entry.method, entry.path, entry.authority, headers)
                verdict = await ask_guard(self._guard, facts, entry)
                if not verdict.allowed:
                    keep = await answer_locally(down, entry, verdict.status, verdict.body)
                else:
                    keep = await self._forward(
                        down, pool, inbound, entry, headers, verdict, trace_headers
                    )
        except DownstreamProtocolError as exc:
            entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
            keep = False
            reason = REASONS.get(exc.status, "Bad Request")
            await answer_if_unanswered(down, entry, exc.status, reason.encode())
        except DownstreamError:
            entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            keep = False
        finally:
            down.idle = None
        if idle.cancelled_caught:
            keep = False
            entry.flags.append(flags.STREAM_IDLE_TIMEOUT)
            await answer_if_unanswered(down, entry, 408, b"stream timeout")
        return keep

    def _start_span(
        self, req: h11.Request, entry: RequestLog, inbound: InboundConnection
    ) -> list[tuple[str, str]]:
        """The request's SERVER span, continuing the source's CLIENT span; its context goes to
        the app in the trace headers."""
        assert self._tracer is not None
        tracer = self._tracer
        span = tracer.start(
            req.headers,
            kind="SERVER",
            name=inbound.span_name or f"{entry.authority}:{inbound.port}/*",
            local=SpanEndpoint(tracer.service_name, inbound.destination_ip),
            remote=SpanEndpoint(None, inbound.source_ip),
        )
        if span.sampled:
            span.span.tags.update(
                {
                    "http.method": entry.method,
                    "http.url": f"http://{entry.authority}{entry.path}",
                    "guid:x-request-id": entry.request_id,
                    "peer.principal": inbound.source_identity or "-",
                    "component": "proxy",
                }
            )
        entry.span, entry.trace_id = span, span.trace_id
        return [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in inject([], span.context, incoming_b3(req.headers))
        ]

    async def _forward(
        self,
        down: Downstream,
        pool: ConnectionPool,
        inbound: InboundConnection,
        entry: RequestLog,
        headers: list[tuple[str, str]],
        verdict: Verdict,
        trace_headers: list[tuple[str, str]],
    ) -> bool:
        request = HttpRequest.from_target(
            entry.method, entry.authority, entry.path, joined(headers), port=inbound.port
        )
        upgrade = "upgrade" in request.headers.get("connection", "").lower()
        head = destination_head(
            entry.method,
            entry.path,
            headers,
            xfcc=inbound.xfcc,
            remove=verdict.remove_headers,
            add=verdict.add_headers,
            strip_params=verdict.strip_params,
            trace_headers=trace_headers,
            upgrade=upgrade and "upgrade" in request.headers,
        )
        body = RequestBody(
            down, limit=self.limits.retry_buffer_bytes, expects_body=not down.body_done()
        )
        endpoint = Endpoint(inbound.destination_ip, inbound.port)
        fresh = False
        while True:
            try:
                up = await pool.acquire(endpoint, inbound.port, fresh=fresh)
            except (OSError, trio.TooSlowError):
                entry.flags.append(flags.UPSTREAM_CONNECT_FAILURE)
                return await answer_locally(down, entry, 503, b"upstream connect error", close=True)
            entry.attempts += 1
            written = False
            try:
                await body.stream_to(up, head)
                written = True
                response = await _response_head(up)
                break
            except DownstreamError:
                await pool.discard(up)
                raise
            except _UPSTREAM_FAILURES:
                await pool.discard(up)
                # A kept-alive connection the app closed while it sat idle: once more, fresh
                # (`attempt.may_resend`).
                stale = up.reused and not up.received_any and body.replayable and not fresh
                if stale and may_resend(head.method, written=written):
                    fresh = True
                    continue
                entry.flags.append(flags.UPSTREAM_RESET)
                return await answer_locally(
                    down, entry, 503, b"upstream reset before response headers", close=True
                )
        return await stream_response(
            pool, down, up, response, request, _FORWARD, entry, upgrade=upgrade
        )


async def _response_head(up: UpstreamConnection) -> h11.Response | h11.InformationalResponse:
    """The app's response head (a 100 Continue skipped; a 101 returned)."""
    while True:
        event = await up.next_event()
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return event
            continue
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before a response")
