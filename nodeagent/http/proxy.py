"""The HTTP/1.1 byte mover: read a request with h11, route it, forward it, stream the answer.

One `HttpProxy` serves many client connections (`await proxy.serve(stream, port=…)`), each a
keep-alive loop: request head → `nodeagent.routing.route_http()` → local answer (no route, redirect,
direct response, fault abort) or forward with retries through pooled upstream connections.

Memory stays bounded: headers by `Limits.max_header_bytes` (→ 431), bodies move chunk by chunk
(the client's body is kept only while it fits `Limits.retry_buffer_bytes`, so that a retry can
replay it; past that, the request is no longer retried). `Expect: 100-continue` is answered by
the proxy itself once it decided to forward (Envoy's default), so a refused request never makes
the client upload. Upgrade (WebSocket) requests are routed like any other and, on a 101, the two
connections are spliced together.

With a `balance.Registry` (`registry=`, or a `BalancedRoutePicker` as the picker) every attempt
is picked by the cluster's balancer and bracketed with `handle.start()` / `handle.finish(latency,
outcome)` (peak-EWMA latencies, outlier detection), retries avoid the endpoint that just failed,
and the cluster's circuit breaker applies (503 UO at once on overflow; see `pool.py`).

Every request ends with one `RequestLog` (to the `on_request` hook and the log), carrying Envoy's
response flags (NR, NC, UH, UF, UO, UR, UT, URX, DI, FI, DPE, DC). With a `tracer`, each request
gets a CLIENT span whose context replaces the tracing headers upstream (docs/observability.md).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import h11
import trio

from nodeagent.balance import NoHealthyUpstream, Outcome, Overflow, PickContext, Registry
from nodeagent.balance import Picker as ClusterPicker
from nodeagent.balance.pool import Token as BreakerToken
from nodeagent.balance.state import EndpointState
from nodeagent.http import errors as flags
from nodeagent.http.errors import DownstreamError, UpstreamDenied, UpstreamOverflow
from nodeagent.http.io import FastIO
from nodeagent.http.pool import ConnectionPool, Connector, UpstreamConnection
from nodeagent.log import get_logger
from nodeagent.routing import (
    DirectResponse,
    HeaderOps,
    HttpRequest,
    RouteDecision,
    RouteDestination,
    Source,
    route_http,
)
from nodeagent.snapshot.model import Endpoint
from nodeagent.snapshot.snapshot import Snapshot
from nodeagent.telemetry.tracing import (
    CURRENT_TRACE,
    TRACE_HEADERS,
    ActiveSpan,
    TraceContext,
    Tracer,
    incoming_b3,
    inject,
)

log = get_logger("http.proxy")

Picker = Callable[[RouteDestination, Sequence[Endpoint]], Endpoint | None]
SourceFor = Source | Callable[[HttpRequest], Source | None]
_conn_ids = itertools.count(1)
T = TypeVar("T")

# Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded; h11 writes framing itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


def random_picker(destination: RouteDestination, endpoints: Sequence[Endpoint]) -> Endpoint | None:
    """The default picker: uniform random (the balance package provides real ones)."""
    return random.choice(endpoints) if endpoints else None


class BalancedRoutePicker:
    """A picker that hands the proxy a `balance.Registry`: `HttpProxy` then picks through the
    registry itself (it needs the handle for feedback and the circuit breaker). Called as a
    plain picker (the mirror), it picks uniformly."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __call__(
        self, destination: RouteDestination, endpoints: Sequence[Endpoint]
    ) -> Endpoint | None:
        return random.choice(endpoints) if endpoints else None


DENIED_BODY = b"RBAC: access denied"


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    max_headers: int = 100
    retry_buffer_bytes: int = 64 * 1024
    header_timeout: float = 60.0  # to receive a complete request head (also keep-alive idle)
    connect_timeout: float = 10.0
    max_idle_per_endpoint: int = 16
    read_size: int = 64 * 1024
    mirror_timeout: float = 10.0


@dataclass(slots=True)
class RequestLog:
    """One completed request, for access logs and metrics."""

    method: str
    authority: str
    path: str
    code: int = 0
    flags: list[str] = field(default_factory=list)
    bytes_received: int = 0
    bytes_sent: int = 0
    duration: float = 0.0
    upstream: str | None = None  # "address:port" of the last endpoint tried
    upstream_cluster: str | None = None  # outbound|port|subset|host
    route_name: str = ""
    request_id: str = ""
    attempts: int = 0
    connection_id: int = 0
    trace_id: str = ""  # set when the proxy has a tracer
    span: ActiveSpan | None = field(default=None, repr=False)
    trace_headers: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def response_flags(self) -> str:
        return ",".join(self.flags) if self.flags else "-"


# -- the client side -----------------------------------------------------------------------------


class _Downstream:
    def __init__(self, stream: trio.abc.Stream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.received = 0
        self.io = FastIO(stream)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.io.receive_some(self.limits.read_size)
                self.received += len(data)
                self.conn.receive_data(data)
                continue
            return event  # type: ignore[return-value]

    async def send(self, event: h11.Event) -> int:
        data = self.conn.send(event)
        if data:
            await self.io.send_all(data)
        return len(data or b"")


class _Body:
    """The client's request body: streamed to an upstream, kept for replay while it fits."""

    def __init__(self, down: _Downstream, *, limit: int, expects_body: bool) -> None:
        self.down = down
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = not expects_body
        self.replayable = True
        self.sent_continue = False

    async def stream_to(self, up: UpstreamConnection, head: h11.Request) -> None:
        """Send the request head and the whole body (replay what is kept, then read the rest)
        and EndOfMessage. What is already at hand goes out in one write: the head, the kept
        chunks and the body events h11 already holds; the batch is flushed only before waiting
        for the client (a small request is a single upstream write)."""
        out = [up.encode(head)]
        out.extend(up.encode(h11.Data(data=chunk)) for chunk in self.chunks)
        conn = self.down.conn
        while not self.complete:
            if conn.they_are_waiting_for_100_continue and not self.sent_continue:
                self.sent_continue = True
                await self._down(
                    self.down.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            try:
                event = conn.next_event()
            except h11.ProtocolError as exc:
                raise DownstreamError(f"client failed while sending the body: {exc}") from exc
            if event is h11.NEED_DATA:
                await up.write(b"".join(out))
                out.clear()
                event = await self._down(self.down.next_event())
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                if self.replayable:
                    if self.size + len(data) > self.limit:
                        self.replayable = False
                        self.chunks.clear()
                    else:
                        self.chunks.append(data)
                        self.size += len(data)
                out.append(up.encode(h11.Data(data=data)))
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                self.complete = True
            else:
                raise DownstreamError(f"unexpected {type(event).__name__} in request body")
        out.append(up.encode(h11.EndOfMessage()))
        await up.write(b"".join(out))

    @staticmethod
    async def _down(awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            raise DownstreamError(f"client failed while sending the body: {exc}") from exc


@dataclass(slots=True)
class _Outcome:
    kind: Literal["response", "connect-failure", "reset", "timeout", "overflow", "denied"]
    up: UpstreamConnection | None = None
    response: h11.Response | h11.InformationalResponse | None = None
    stale: bool = False
    detail: str = ""


class HttpProxy:
    """Routes and forwards HTTP/1.1 requests; one instance per source (pod or gateway).

    `snapshot` returns the current Snapshot (read once per request); `source` is the caller, or a
    function of the request (a gateway picks its Gateway by Host), None meaning 404. `connector`
    opens a stream to an endpoint: `await connector(endpoint, service_port)`; `picker` chooses an
    endpoint among the destination's ones. `on_request` is called once per completed request;
    `access_logged` says it writes the access-log line, so the proxy's own `request.complete`
    line drops to debug (one line per request, not two).
    """

    def __init__(
        self,
        *,
        snapshot: Callable[[], Snapshot],
        source: SourceFor,
        connector: Connector,
        picker: Picker = random_picker,
        on_request: Callable[[RequestLog], None] | None = None,
        limits: Limits | None = None,
        rand: Callable[[], float] = random.random,
        name: str = "http",
        tracer: Tracer | None = None,
        registry: Registry | None = None,
        access_logged: bool = False,
    ) -> None:
        self._snapshot = snapshot
        self._quiet = access_logged
        if registry is None and isinstance(picker, BalancedRoutePicker):
            registry = picker.registry
        self.registry = registry
        self._tracer = tracer
        self._source = source
        self._picker = picker
        self._on_request = on_request
        self.limits = limits or Limits()
        self._rand = rand
        self.name = name
        self.pool = ConnectionPool(
            connector,
            max_idle_per_endpoint=self.limits.max_idle_per_endpoint,
            connect_timeout=self.limits.connect_timeout,
            max_header_bytes=self.limits.max_header_bytes,
        )
        self._stats: Counter[str] = Counter()

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
        down = _Downstream(client, self.limits)
        conn_id = next(_conn_ids)
        self._stats["connections"] += 1
        try:
            async with trio.open_nursery() as mirrors:
                await self._serve_loop(down, port, host, client_address, conn_id, mirrors)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _serve_loop(
        self,
        down: _Downstream,
        port: int,
        host: str | None,
        client_address: str | None,
        conn_id: int,
        mirrors: trio.Nursery,
    ) -> None:
        try:
            while True:
                event = None
                received_before = down.received
                with trio.move_on_after(self.limits.header_timeout):
                    event = await self._read_head(down, conn_id)
                if not isinstance(event, h11.Request):
                    return  # closed, malformed (answered), or idle past header_timeout
                keep = await self._handle(
                    down, event, port, host, client_address, conn_id, mirrors, received_before
                )
                if not keep:
                    return
                down.conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, DownstreamError):
            pass

    async def _read_head(
        self, down: _Downstream, conn_id: int
    ) -> h11.Event | type[h11.PAUSED] | None:
        started = trio.current_time()
        try:
            event = await down.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
            entry = RequestLog(method="-", authority="-", path="-", connection_id=conn_id)
            entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
            if down.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                reason = "Request Header Fields Too Large" if status == 431 else "Bad Request"
                await self._local(down, entry, status, reason.encode(), close=True)
            self._finish(entry, started)
            return None
        if isinstance(event, h11.Request) and (
            len(event.headers) > self.limits.max_headers
            or _head_size(event) > self.limits.max_header_bytes
        ):
            entry = self._entry(event, conn_id)
            entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
            await self._local(down, entry, 431, b"request headers too large", close=True)
            self._finish(entry, started)
            return None
        return event

    # -- one request -------------------------------------------------------------------------

    def _entry(self, req: h11.Request, conn_id: int) -> RequestLog:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers}
        return RequestLog(
            method=req.method.decode("latin-1"),
            authority=headers.get("host", ""),
            path=req.target.decode("latin-1"),
            request_id=headers.get("x-request-id", ""),
            connection_id=conn_id,
        )

    async def _handle(
        self,
        down: _Downstream,
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
        headers: list[tuple[str, str]] = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers
        ]
        joined: dict[str, str] = {}
        last: dict[str, str] = {}
        for k, v in headers:
            joined[k] = f"{joined[k]}, {v}" if k in joined else v
            last[k] = v
        entry = RequestLog(
            method=req.method.decode("latin-1"),
            authority=last.get("host", ""),
            path=req.target.decode("latin-1"),
            request_id=last.get("x-request-id", ""),
            connection_id=conn_id,
        )
        target = entry.path
        authority = entry.authority
        if target.startswith(("http://", "https://")):  # absolute-form (a forward proxy request)
            rest = target.split("://", 1)[1]
            authority, slash, path = rest.partition("/")
            target = slash + path if slash else "/"
        if not entry.request_id:
            entry.request_id = new_request_id()
        request = HttpRequest.from_target(
            entry.method, authority, target, joined, port=port, host=host
        )
        token = self._start_span(req, entry, request) if self._tracer is not None else None
        try:
            source = self._source(request) if callable(self._source) else self._source
            try:
                decision = (
                    route_http(self._snapshot(), source, request, rand=self._rand)
                    if source is not None
                    else RouteDecision(kind="no_route")
                )
            except Exception as exc:  # a stored document the validator let through; not fatal
                log.error("request.route_failed", path=entry.path, error=repr(exc))
                decision = RouteDecision(
                    kind="direct", direct=DirectResponse(500, b"routing failed")
                )
            entry.route_name = decision.route_name
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
        except DownstreamError:
            entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            keep = False
        finally:
            if token is not None:
                CURRENT_TRACE.reset(token)
        entry.bytes_received = down.received - received_before
        self._finish(entry, started)
        return keep

    def _start_span(
        self, req: h11.Request, entry: RequestLog, request: HttpRequest
    ) -> Token[TraceContext | None]:
        """The CLIENT span of this request (continuing the caller's trace); its context goes
        upstream in the headers and, through CURRENT_TRACE, in a new tunnel's header."""
        assert self._tracer is not None
        span = self._tracer.start(
            req.headers,
            kind="CLIENT",
            name=f"{request.authority_host}:{request.port}/*",
            tags={
                "http.method": entry.method,
                "http.url": f"http://{request.authority}{entry.path}",
                "guid:x-request-id": entry.request_id,
                "component": "proxy",
            },
        )
        entry.span, entry.trace_id = span, span.trace_id
        entry.trace_headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in inject([], span.context, incoming_b3(req.headers))
        ]
        return CURRENT_TRACE.set(span.context)

    def _finish(self, entry: RequestLog, started: float) -> None:
        entry.duration = trio.current_time() - started
        if entry.span is not None:
            tags = {"response_flags": entry.response_flags}
            if entry.upstream_cluster:
                tags["upstream_cluster"] = entry.upstream_cluster
            if entry.upstream:
                tags["upstream_host"] = entry.upstream
            entry.span.finish(status_code=entry.code, tags=tags)
        self._stats["requests"] += 1
        self._stats[_CODE_KEYS.get(entry.code // 100) or f"code_{entry.code // 100}xx"] += 1
        for f in entry.flags:
            self._stats[f"flag_{f}"] += 1
        # One line per request: with an access log behind `on_request` this one is debug.
        (log.debug if self._quiet else log.info)(
            "request.complete",
            proxy=self.name,
            conn=entry.connection_id,
            method=entry.method,
            authority=entry.authority,
            path=entry.path,
            code=entry.code,
            flags=entry.response_flags,
            upstream=entry.upstream,
            cluster=entry.upstream_cluster,
            route=entry.route_name,
            attempts=entry.attempts,
            bytes_received=entry.bytes_received,
            bytes_sent=entry.bytes_sent,
            ms=round(entry.duration * 1000, 3),
            request_id=entry.request_id,
        )
        if self._on_request is not None:
            try:
                self._on_request(entry)
            except Exception as exc:  # a broken metrics hook must not break traffic
                log.warning("request.hook_failed", error=repr(exc))

    async def _local(
        self,
        down: _Downstream,
        entry: RequestLog,
        status: int,
        body: bytes,
        *,
        close: bool = False,
        extra: Sequence[tuple[str, str]] = (),
        response_headers: HeaderOps | None = None,
    ) -> bool:
        """Answer locally. Returns whether the connection can serve another request."""
        # A body the client is still sending (or waiting to send) would be read as the next
        # request: skip what is already buffered, close instead of draining the rest.
        _skip_buffered_body(down)
        keep = not close and down.conn.their_state is h11.DONE
        hdrs = [("content-length", str(len(body))), *extra]
        if body:
            hdrs.append(("content-type", "text/plain"))
        if response_headers:
            hdrs = response_headers.apply(hdrs)
        if not keep:
            hdrs.append(("connection", "close"))
        try:
            data = b"".join(
                down.conn.send(ev) or b""
                for ev in (
                    h11.Response(status_code=status, headers=hdrs),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                )
            )
        except h11.LocalProtocolError:
            return False
        entry.code = status
        await down.io.send_all(data)
        entry.bytes_sent += len(data)
        return keep and down.conn.our_state is h11.DONE

    async def _execute(
        self,
        down: _Downstream,
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
            return await self._local(down, entry, 404, b"")
        if decision.kind == "redirect" and decision.redirect is not None:
            return await self._local(
                down,
                entry,
                decision.redirect.status,
                b"",
                extra=[("location", decision.redirect.location)],
                response_headers=decision.response_headers,
            )
        if decision.kind == "direct" and decision.direct is not None:
            return await self._local(
                down,
                entry,
                decision.direct.status,
                decision.direct.body,
                response_headers=decision.response_headers,
            )
        if decision.fault.abort_status is not None:
            entry.flags.append(flags.FAULT_INJECTED)
            return await self._local(
                down, entry, decision.fault.abort_status, b"fault filter abort"
            )
        dest = decision.chosen
        if dest is None or dest.error is not None or dest.service is None or dest.port is None:
            entry.flags.append(flags.NO_CLUSTER)
            return await self._local(down, entry, 503, b"no cluster for the route's destination")
        entry.upstream_cluster = dest.name
        return await self._forward(
            down, request, headers, decision, dest, entry, client_address, mirrors, source_ns
        )

    # -- forwarding --------------------------------------------------------------------------

    def _upstream_head(
        self,
        request: HttpRequest,
        headers: list[tuple[str, str]],
        decision: RouteDecision,
        entry: RequestLog,
        client_address: str | None,
        upgrade: bool,
    ) -> h11.Request:
        joined = request.headers
        named_by_connection = {
            n.strip().lower() for n in joined.get("connection", "").split(",") if n.strip()
        }
        out: list[tuple[str, str]] = [("host", decision.authority or request.authority)]
        for k, v in headers:
            if k == "host" or k in _HOP_BY_HOP or k in named_by_connection:
                continue
            if k in ("x-forwarded-for", "x-forwarded-proto", "x-request-id", "content-length"):
                continue
            if entry.trace_headers and k.encode("latin-1") in TRACE_HEADERS:
                continue  # replaced by this hop's span context below
            out.append((k, v))
        out.extend(entry.trace_headers)
        xff = joined.get("x-forwarded-for")
        if client_address:
            xff = f"{xff}, {client_address}" if xff else client_address
        if xff:
            out.append(("x-forwarded-for", xff))
        out.append(("x-forwarded-proto", joined.get("x-forwarded-proto", request.scheme)))
        out.append(("x-request-id", entry.request_id))
        out = decision.request_headers.apply(out)
        if "content-length" in joined:
            out.append(("content-length", joined["content-length"]))
        elif "chunked" in joined.get("transfer-encoding", "").lower():
            out.append(("transfer-encoding", "chunked"))
        if upgrade:
            out.append(("connection", "upgrade"))
            out.append(("upgrade", joined.get("upgrade", "")))
        return h11.Request(method=request.method, target=decision.path, headers=out)

    async def _forward(
        self,
        down: _Downstream,
        request: HttpRequest,
        headers: list[tuple[str, str]],
        decision: RouteDecision,
        dest: RouteDestination,
        entry: RequestLog,
        client_address: str | None,
        mirrors: trio.Nursery,
        source_ns: str | None = None,
    ) -> bool:
        assert dest.service is not None
        assert dest.port is not None
        snapshot = self._snapshot()
        endpoints = snapshot.endpoints(dest.service, dest.port, subset=dest.subset_labels)
        if not endpoints:
            entry.flags.append(flags.NO_HEALTHY_UPSTREAM)
            return await self._local(down, entry, 503, b"no healthy upstream")
        cluster: ClusterPicker | None = None
        if self.registry is not None:
            cluster = self.registry.picker_for(
                snapshot, dest.service, dest.subset, dest.port, from_namespace=source_ns or None
            )
        upgrade = (
            "upgrade" in request.headers
            and "upgrade" in request.headers.get("connection", "").lower()
        )
        head = self._upstream_head(request, headers, decision, entry, client_address, upgrade)
        body = _Body(
            down,
            limit=self.limits.retry_buffer_bytes,
            expects_body=down.conn.their_state is h11.SEND_BODY,
        )
        policy = decision.retries
        tries = 1 + (0 if upgrade else policy.attempts)
        deadline = (
            trio.current_time() + decision.timeout if decision.timeout is not None else math.inf
        )
        tried: list[Endpoint] = []
        outcome: _Outcome | None = None
        stale_retried = False
        held: list[BreakerToken] = []  # retry tokens (maxRetries), released when the request ends
        handle: EndpointState | None = None
        ctx = (
            PickContext(headers=request.headers, source_ip=client_address, path=request.target)
            if cluster is not None
            else None
        )

        def may_retry() -> bool:
            if cluster is None:
                return True
            token = cluster.breaker.try_acquire_retry()
            if isinstance(token, Overflow):
                return False  # retry budget spent: the last answer goes back as it is
            held.append(token)
            return True

        try:
            # A cancel scope costs an enter/exit per request: only when there is a deadline.
            overall = trio.CancelScope(deadline=deadline) if deadline != math.inf else None
            with overall if overall is not None else _NO_SCOPE:
                attempt = 0
                while attempt < tries:
                    if cluster is not None and ctx is not None:
                        try:
                            handle = cluster.pick(ctx, avoid=handle)
                        except NoHealthyUpstream:
                            entry.flags.append(flags.NO_HEALTHY_UPSTREAM)
                            return await self._local(down, entry, 503, b"no healthy upstream")
                        endpoint: Endpoint | None = handle.endpoint
                    else:
                        candidates = [e for e in endpoints if e not in tried] or list(endpoints)
                        try:
                            endpoint = self._picker(dest, candidates)
                        except UpstreamOverflow:
                            endpoint = None
                            outcome = _Outcome("overflow")
                    if endpoint is None:
                        if outcome is None or outcome.kind != "overflow":
                            entry.flags.append(flags.NO_HEALTHY_UPSTREAM)
                            return await self._local(down, entry, 503, b"no healthy upstream")
                        break
                    tried.append(endpoint)
                    entry.upstream = f"{endpoint.address}:{endpoint.port}"
                    entry.attempts += 1
                    outcome = await self._measured_attempt(
                        cluster, handle, endpoint, dest.port, head, body, policy.per_try_timeout
                    )
                    last = attempt + 1 >= tries or not body.replayable
                    if outcome.stale and not stale_retried and body.replayable:
                        stale_retried = True  # an idle pooled connection the server had closed
                        entry.attempts -= 1
                        continue
                    if outcome.kind == "response":
                        assert outcome.response is not None
                        assert outcome.up is not None
                        status = outcome.response.status_code
                        if (
                            not last
                            and policy.retriable_status(status)
                            and not upgrade
                            and may_retry()
                        ):
                            await self.pool.discard(outcome.up)
                            attempt += 1
                            continue
                        if attempt > 0 and policy.retriable_status(status):
                            entry.flags.append(flags.UPSTREAM_RETRY_LIMIT)
                        keep = await self._respond(down, request, decision, entry, outcome, upgrade)
                        if decision.mirror is not None and body.complete and body.replayable:
                            mirrors.start_soon(self._mirror, decision, head, list(body.chunks))
                        return keep
                    kind = outcome.kind
                    if kind == "overflow" or kind == "denied" or last:
                        break
                    if not policy.retriable_failure(kind) or not may_retry():
                        break
                    attempt += 1
        finally:
            for token in held:
                token.release()
        if outcome is not None and outcome.kind == "denied":
            # The destination's authorization policy refused the tunnel: what Istio clients see.
            return await self._local(down, entry, 403, DENIED_BODY)
        timed_out = overall is not None and overall.cancelled_caught
        if timed_out or (outcome is not None and outcome.kind == "timeout"):
            entry.flags.append(flags.UPSTREAM_TIMEOUT)
            if entry.attempts > 1:
                entry.flags.append(flags.UPSTREAM_RETRY_LIMIT)
            return await self._local(down, entry, 504, b"upstream request timeout", close=True)
        assert outcome is not None
        if entry.attempts > 1:
            entry.flags.append(flags.UPSTREAM_RETRY_LIMIT)
        if outcome.kind == "overflow":
            entry.flags.insert(0, flags.UPSTREAM_OVERFLOW)
            return await self._local(down, entry, 503, b"upstream overflow")
        if outcome.kind == "connect-failure":
            entry.flags.insert(0, flags.UPSTREAM_CONNECT_FAILURE)
            reason = "connection failure"
        else:
            entry.flags.insert(0, flags.UPSTREAM_RESET)
            reason = "connection termination"
        msg = f"upstream connect error or disconnect/reset before headers. reset reason: {reason}"
        return await self._local(down, entry, 503, msg.encode())

    async def _measured_attempt(
        self,
        cluster: ClusterPicker | None,
        handle: EndpointState | None,
        endpoint: Endpoint,
        service_port: int,
        head: h11.Request,
        body: _Body,
        per_try_timeout: float | None,
    ) -> _Outcome:
        """One attempt, bracketed for the balancer: in flight from pick to response head; the
        latency and how it ended feed peak-EWMA and outlier detection."""
        if cluster is None or handle is None:
            return await self._attempt(endpoint, service_port, head, body, per_try_timeout)
        request_token = cluster.breaker.try_acquire_request()
        if isinstance(request_token, Overflow):
            return _Outcome("overflow", detail=str(request_token))
        handle.start()
        started = trio.current_time()
        result = Outcome.TIMEOUT  # a cancellation (route timeout) ends the attempt here
        try:
            outcome = await self._attempt(
                endpoint, service_port, head, body, per_try_timeout, cluster
            )
            result = _balance_outcome(outcome)
            return outcome
        except DownstreamError:
            result = Outcome.CANCELLED
            raise
        finally:
            handle.finish(trio.current_time() - started, result)
            request_token.release()

    async def _attempt(
        self,
        endpoint: Endpoint,
        service_port: int,
        head: h11.Request,
        body: _Body,
        per_try_timeout: float | None,
        cluster: ClusterPicker | None = None,
    ) -> _Outcome:
        try:
            if cluster is None:
                up = await self.pool.acquire(endpoint, service_port)
            else:
                pool = cluster.policy.pool
                up = await self.pool.acquire(
                    endpoint,
                    service_port,
                    breaker=cluster.breaker,
                    connect_timeout=min(pool.connect_timeout_s, self.limits.connect_timeout),
                    idle_timeout=pool.http_idle_timeout_s,
                )
        except UpstreamOverflow as exc:
            return _Outcome("overflow", detail=str(exc))
        except UpstreamDenied as exc:
            return _Outcome("denied", detail=str(exc))
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            return _Outcome("connect-failure", detail=str(exc))
        timed_out = True
        try:
            with trio.move_on_after(per_try_timeout) if per_try_timeout else _NO_SCOPE:
                await body.stream_to(up, head)
                while True:
                    event = await up.next_event()
                    if isinstance(event, h11.Response):
                        timed_out = False
                        return _Outcome("response", up=up, response=event)
                    if isinstance(event, h11.InformationalResponse):
                        if event.status_code == 101:
                            timed_out = False
                            return _Outcome("response", up=up, response=event)
                        continue  # 100 Continue, 103 Early Hints: the client is not told
                    if isinstance(event, h11.ConnectionClosed):
                        break
                    raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 502)
                timed_out = False
                await self.pool.discard(up)
                return _Outcome("reset", stale=up.reused and not up.received_any)
        except DownstreamError:
            await self.pool.discard(up)
            raise
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            OSError,
        ) as exc:
            timed_out = False
            await self.pool.discard(up)
            return _Outcome("reset", stale=up.reused and not up.received_any, detail=str(exc))
        finally:
            if timed_out:
                await self.pool.discard(up)
        return _Outcome("timeout")

    async def _respond(
        self,
        down: _Downstream,
        request: HttpRequest,
        decision: RouteDecision,
        entry: RequestLog,
        outcome: _Outcome,
        upgrade: bool,
    ) -> bool:
        up = outcome.up
        response = outcome.response
        assert up is not None
        assert response is not None
        entry.code = response.status_code
        hdrs = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.headers
            if k.decode("latin-1") not in _HOP_BY_HOP
        ]
        hdrs = decision.response_headers.apply(hdrs)
        if response.status_code == 101 and upgrade:
            hdrs += [("connection", "upgrade"), ("upgrade", request.headers.get("upgrade", ""))]
            entry.bytes_sent += await down.send(
                h11.InformationalResponse(status_code=101, headers=hdrs, reason=response.reason)
            )
            await self._splice(down, up, entry)
            return False
        close = down.conn.their_state is not h11.DONE and not _body_done(down)
        # The head and every body event h11 already holds go out in one write; the batch is
        # flushed only before waiting for the upstream (a small answer is one client write).
        out: list[bytes] = []

        def queue(event: h11.Event) -> None:
            data = down.conn.send(event)
            if data:
                out.append(data)
                entry.bytes_sent += len(data)

        async def flush() -> None:
            if out:
                data = b"".join(out)
                out.clear()
                await down.io.send_all(data)

        try:
            queue(
                h11.Response(status_code=response.status_code, headers=hdrs, reason=response.reason)
            )
            while True:
                event: object = None
                try:
                    event = up.conn.next_event()
                except h11.ProtocolError:
                    event = None
                if event is h11.NEED_DATA:
                    await flush()  # outside the upstream's try: a client failure is DC
                    try:
                        event = await up.next_event()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                        event = None
                if isinstance(event, h11.Data):
                    queue(h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    queue(h11.EndOfMessage())
                    await flush()
                    break
                else:
                    # Headers are out (or about to be): closing is the only way to signal it.
                    entry.flags.append(flags.UPSTREAM_RESET)
                    await flush()
                    await self.pool.discard(up)
                    return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            await self.pool.discard(up)
            return False
        except trio.Cancelled:
            await self.pool.discard(up)
            raise
        await self.pool.release(up)
        return not close and down.conn.our_state is h11.DONE and down.conn.their_state is h11.DONE

    async def _splice(self, down: _Downstream, up: UpstreamConnection, entry: RequestLog) -> None:
        """After a 101: raw bytes both ways until both sides are done."""
        client_rest, _ = down.conn.trailing_data
        upstream_rest, _ = up.conn.trailing_data

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, first: bytes, out: bool) -> None:
            try:
                if first:
                    await dst.send_all(first)
                while True:
                    data = await src.receive_some(self.limits.read_size)
                    if not data:
                        break
                    if out:
                        entry.bytes_sent += len(data)
                    await dst.send_all(data)
                if isinstance(dst, trio.SocketStream):
                    await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, down.stream, up.stream, bytes(client_rest), False)
                nursery.start_soon(pump, up.stream, down.stream, bytes(upstream_rest), True)
        finally:
            await self.pool.discard(up)

    async def _mirror(
        self, decision: RouteDecision, head: h11.Request, chunks: list[bytes]
    ) -> None:
        """Send a copy of a (fully buffered) request to the mirror; the answer is dropped."""
        dest = decision.mirror
        if dest is None or dest.service is None or dest.port is None or dest.error:
            return
        endpoints = self._snapshot().endpoints(dest.service, dest.port, subset=dest.subset_labels)
        try:
            endpoint = self._picker(dest, endpoints)
        except UpstreamOverflow:
            return
        if endpoint is None:
            return
        host = next((v.decode() for k, v in head.headers if k == b"host"), "")
        shadow_host = host.split(":", 1)[0] + "-shadow"
        headers = [(k, v) for k, v in head.headers if k != b"host"]
        copy = h11.Request(
            method=head.method,
            target=head.target,
            headers=[(b"host", shadow_host.encode()), *headers],
        )
        with trio.move_on_after(self.limits.mirror_timeout):
            try:
                up = await self.pool.acquire(endpoint, dest.port, fresh=True)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, UpstreamOverflow):
                return
            try:
                await up.send(copy)
                for chunk in chunks:
                    await up.send(h11.Data(data=chunk))
                await up.send(h11.EndOfMessage())
                while not isinstance(
                    await up.next_event(), h11.EndOfMessage | h11.ConnectionClosed
                ):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
                pass
            finally:
                await self.pool.discard(up)
        self._stats["mirrored"] += 1


_CODE_KEYS = {n: f"code_{n}xx" for n in range(6)}


class _NoScope:
    """Stands in for a cancel scope when there is no deadline (enter/exit do nothing); typed
    like one (`__exit__ -> bool`) so that code after the `with` stays reachable for mypy."""

    def __enter__(self) -> None:
        return None

    cancelled_caught = False  # as a CancelScope's: never, there is no deadline

    def __exit__(self, *exc: object) -> bool:
        return self.cancelled_caught


_NO_SCOPE = _NoScope()


def new_request_id() -> str:
    """A random (version 4) UUID for x-request-id, as Envoy makes one. From `random`, not
    `os.urandom` as `uuid.uuid4()` (a syscall per request): an id must be unique, not secret."""
    n = (
        (random.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48))
        | (0x4000 << 64)
        | (0x8000 << 48)
    )
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _balance_outcome(outcome: _Outcome) -> Outcome:
    """How an attempt counts for outlier detection (Envoy: local-origin failures are 503s)."""
    if outcome.kind == "response":
        assert outcome.response is not None
        return Outcome.from_status(outcome.response.status_code)
    if outcome.kind == "connect-failure":
        return Outcome.CONNECT_FAILURE
    if outcome.kind == "timeout":
        return Outcome.TIMEOUT
    if outcome.kind == "reset" and not outcome.stale:
        return Outcome.GATEWAY_ERROR
    # overflow (a local limit), denied (policy, not health), stale (our idle connection)
    return Outcome.CANCELLED


def _body_done(down: _Downstream) -> bool:
    return down.conn.their_state is not h11.SEND_BODY


def _head_size(req: h11.Request) -> int:
    # h11 bounds only an incomplete head; one that arrived whole in a read is measured here.
    return len(req.target) + sum(len(k) + len(v) + 4 for k, v in req.headers)


def _skip_buffered_body(down: _Downstream) -> None:
    """Consume the request's body events h11 already holds (a GET's EndOfMessage), no I/O."""
    while down.conn.their_state is h11.SEND_BODY:
        event = down.conn.next_event()
        if not isinstance(event, h11.Data):
            return
