"""The HTTP/2 (h2c) and gRPC proxy: terminate the client's HTTP/2, route every request (stream)
with the same decision as HTTP/1.1 (`nodeagent.routing.route_http`), run it through the same
attempt loop (`nodeagent.http.attempt.run_attempts`: pick, breaker, retries, timeouts), each
attempt a stream on a pooled upstream HTTP/2 connection (`pool.py`) to the endpoint the
cluster's balancer picked: one client connection is spread over the service's replicas request
by request. The client may speak HTTP/1.1 instead (`serve_http1`, `h1client.py`), and a request
whose destination port declares HTTP/1.1 goes upstream as HTTP/1.1 (`h1upstream.py`): the
upstream codec is the destination port's (`selection.py`), whatever the client's.

gRPC: a request with `content-type: application/grpc…` is answered, when the mesh answers it
(no route, no endpoint, fault abort, timeout…), with a trailers-only gRPC error (HTTP 200 and
`grpc-status`, `routing/grpc.py`); `grpc-status` in a trailers-only response decides retries
(`retryOn` cancelled, deadline-exceeded, internal, resource-exhausted, unavailable) and the
outlier detector's view; the trailers pass through; `grpc-timeout` bounds the request with the
route timeout (the smaller wins). Bodies stream both ways at once (bidirectional calls) with
flow control end to end; the route timeout, when set, bounds the whole stream, as Envoy's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
from collections.abc import Callable
from contextvars import Token
from dataclasses import dataclass
from functools import partial

import trio

from nodeagent.balance import Outcome, PickContext, Registry
from nodeagent.balance import Picker as Cluster
from nodeagent.balance.state import EndpointState
from nodeagent.http import flags
from nodeagent.http.attempt import AttemptOutcome, LocalReply, run_attempts
from nodeagent.http.downstream import Downstream, Drain, answer_head_timeout, read_request
from nodeagent.http.errors import UpstreamDenied, UpstreamOverflow
from nodeagent.http.guard import Guard
from nodeagent.http.guarded import guard_request, local_address
from nodeagent.http.headers import new_request_id
from nodeagent.http.limits import Limits
from nodeagent.http.log import RequestLog, RequestRecorder, log, start_span_for
from nodeagent.http.origination import UpstreamTlsError
from nodeagent.http.pool import ConnectionPool
from nodeagent.http2.conn import H2Connection, H2Stream, Headers, StreamReset, close_when_idle
from nodeagent.http2.h1client import H1ClientConnection, H1ClientStream
from nodeagent.http2.h1upstream import H1Upstreams
from nodeagent.http2.messages import (
    BadRequest,
    RequestHead,
    grpc_reply,
    grpc_status_of,
    parse_request,
    plain_reply,
    response_head,
    routing_request,
    upstream_headers,
)
from nodeagent.http2.mirror import mirror
from nodeagent.http2.pool import Connector, H2Pool, H2Upstreams
from nodeagent.http2.relay import relay_response
from nodeagent.http2.selection import Codec, destination_port, upstream_codec
from nodeagent.http2.streams import ClientStream, RequestFacts, Upstreams, UpstreamStream
from nodeagent.routing import (
    DirectResponse,
    HeaderOps,
    HttpRequest,
    RouteDecision,
    RouteDestination,
    Source,
    route_http,
)
from nodeagent.routing.grpc import (
    GrpcStatus,
    grpc_to_http_status,
    http_to_grpc_status,
    parse_grpc_timeout,
)
from nodeagent.snapshot.snapshot import Snapshot
from nodeagent.telemetry.tracing import CURRENT_TRACE, TraceContext, Tracer
from nodeagent.tunnel import TlsStream
from nodeagent.tunnel.goaway import DrainSet

SourceFor = Source | Callable[[HttpRequest], Source | None]
_conn_ids = itertools.count(1)
NO_OPS = HeaderOps()


@dataclass(frozen=True, slots=True)
class _Client:
    """One client connection, as its requests see it."""

    codec: Codec  # what the client speaks
    port: int  # the port it addressed
    host: str | None  # the service host it addressed (None: route by authority)
    address: str | None  # its IP (x-forwarded-for)
    conn_id: int
    peer: str  # "ip:port", for the access log
    local: str  # the address it connected to (the guard's destination.ip)
    scheme: str  # "https" when this proxy terminated its TLS (the gateway's HTTPS servers)


def _peer_of(client: trio.abc.Stream, fallback: str | None) -> str:
    if isinstance(client, trio.SocketStream):
        try:
            peer = client.socket.getpeername()
            return f"{peer[0]}:{peer[1]}"
        except OSError:
            pass
    return fallback or ""


class H2Proxy:
    """Routes and forwards HTTP/2 requests; one per source (pod, or the ingress gateway).
    `run()` must be running (it holds the pooled upstream connections); the rest is as
    `nodeagent.http.HttpProxy` (`guard` included).

    Its clients speak HTTP/2 (`serve`) or HTTP/1.1 (`serve_http1`, translated: `h1client.py`);
    each request's upstream speaks what its destination port declares (`selection.py`): HTTP/2
    on pooled multiplexed connections, or HTTP/1.1 on pooled keep-alive ones (`h1upstream.py`).
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
        name: str = "http2",
        access_logged: bool = False,
        tracer: Tracer | None = None,
        guard: Guard | None = None,
    ) -> None:
        self._tracer = tracer
        self._guard = guard
        self._snapshot = snapshot
        self._source = source
        self.registry = registry
        self.limits = limits or Limits()
        self._rand = rand
        self.name = name
        self.pool = H2Pool(connector, connect_timeout=self.limits.connect_timeout)
        self.http1_pool = ConnectionPool(
            connector,
            max_idle_per_endpoint=self.limits.max_idle_per_endpoint,
            connect_timeout=self.limits.connect_timeout,
            max_header_bytes=self.limits.max_header_bytes,
        )
        self._upstreams: dict[Codec, Upstreams] = {
            "h2": H2Upstreams(self.pool),
            "http1": H1Upstreams(self.http1_pool, connect_timeout=self.limits.connect_timeout),
        }
        self._recorder = RequestRecorder(name, on_request, quiet=access_logged)
        self._stats = self._recorder.stats
        self._drain = Drain()  # HTTP/1.1 clients: `connection: close` once draining
        self._conns = DrainSet()  # HTTP/2 clients: a graceful GOAWAY

    def drain(self) -> None:
        """The agent drains (a graceful restart): HTTP/2 clients get a graceful GOAWAY (their
        next requests go to a new connection, so to the agent taking over; those under way
        finish here), HTTP/1.1 clients `connection: close` on their next response."""
        self._drain.on = True
        self._conns.drain()

    def statistics(self) -> dict[str, int]:
        return {
            **self._stats,
            "pool_connections": self.pool.connection_count(),
            "pool_connects": self.pool.stats.connects,
            "pool_reuses": self.pool.stats.reuses,
            "http1_pool_idle": self.http1_pool.idle_count(),
            "http1_pool_connects": self.http1_pool.stats.connects,
            "http1_pool_reuses": self.http1_pool.stats.reuses,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.pool.run(task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self.http1_pool.aclose()  # its idle keep-alive connections

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.http1_pool.aclose()

    async def serve(
        self,
        client: trio.abc.Stream,
        *,
        port: int = 80,
        host: str | None = None,
        client_address: str | None = None,
    ) -> None:
        """Serve one client HTTP/2 connection (its preface not yet read) until it closes."""
        facts = self._client("h2", client, port, host, client_address)
        conn = H2Connection(client, client=False)

        async def handle(stream: H2Stream) -> None:
            await self._request(stream, facts)

        try:
            with self._conns.serving(conn):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(close_when_idle, conn, self.limits.idle_timeout)
                    await conn.run(handle)
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # the connection ends; the pod's proxy goes on
            log.error("connection.failed", proxy=self.name, conn=facts.conn_id, error=repr(exc))

    async def serve_http1(
        self,
        client: trio.abc.Stream,
        *,
        port: int = 80,
        host: str | None = None,
        client_address: str | None = None,
    ) -> None:
        """Serve one HTTP/1.1 client connection (keep-alive) until it closes: every request
        as an HTTP/2 client's (Envoy's HTTP/1.1 → HTTP/2 bridge, `h1client.py`)."""
        facts = self._client("http1", client, port, host, client_address)
        conn = H1ClientConnection.of(client, self.limits, address=facts.peer, drain=self._drain)

        async def read(down: Downstream) -> object:
            return await read_request(down, self.limits, self._recorder, facts.conn_id)

        async def head_timeout(down: Downstream) -> None:
            await answer_head_timeout(down, self._recorder, facts.conn_id)

        try:
            await conn.serve(partial(self._request, client=facts), read, head_timeout)
        except Exception as exc:  # the connection ends; the pod's proxy goes on
            log.error("connection.failed", proxy=self.name, conn=facts.conn_id, error=repr(exc))

    @property
    def http1_bridge(self) -> Http1Bridge:
        """The `nodeagent.http.bridge.Bridge` an `HttpProxy` hands HTTP/2-bound requests to."""
        return Http1Bridge(self)

    async def forward_http1(
        self,
        down: Downstream,
        request: HttpRequest,
        headers: list[tuple[str, str]],
        decision: RouteDecision,
        dest: RouteDestination,
        entry: RequestLog,
        client_address: str | None,
        source_ns: str | None,
    ) -> bool:
        """An HTTP/1.1 proxy's routed request, forwarded translated (`Http1Bridge`); whether
        the client connection can go on."""
        conn = H1ClientConnection(down)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        stream = H1ClientStream(conn, request.method.encode(), request.target.encode(), raw)
        stream.on_activity = down.touch
        assert stream.headers is not None
        head: RequestHead | None = None
        detail = b""
        try:
            head = parse_request(stream.headers)
        except BadRequest as exc:  # nothing HTTP/2 can carry (no authority)
            entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
            detail = str(exc).encode()
        reply = _Replier(stream, entry, grpc=head is not None and head.grpc)
        reply.touch = down.touch
        if reply.grpc:
            entry.protocol = "grpc"
        client = _Client(
            "http1",
            request.port,
            request.host,
            client_address,
            entry.connection_id,
            down.address,
            "",
            request.scheme,
        )
        if stream.ended:
            conn.watch_client(stream)
        cancel = trio.CancelScope()
        stream.on_fail = cancel.cancel
        try:
            async with trio.open_nursery() as writer:
                writer.start_soon(conn.writer.run)
                try:
                    with cancel:
                        if head is None:
                            await reply.local(400, detail)
                        else:
                            await self._forward(
                                stream, head, request, decision, dest, reply, entry, client,
                                source_ns,
                            )  # fmt: skip
                except StreamReset:
                    pass
                except Exception as exc:  # one request's bug ends its connection, not the proxy
                    log.error("request.failed", path=entry.path, error=repr(exc), exc_info=exc)
                    stream.reset()
                if cancel.cancelled_caught or (stream.error and stream.on_fail is not None):
                    entry.flags.append(flags.DOWNSTREAM_TERMINATION)
                    if not reply.head_sent:
                        entry.code = 0
                await conn.writer.drain()
                writer.cancel_scope.cancel()
        finally:
            conn.unwatch()
            entry.bytes_sent += stream.sent_bytes
        return conn.reusable(stream)

    def _client(
        self,
        codec: Codec,
        client: trio.abc.Stream,
        port: int,
        host: str | None,
        address: str | None,
    ) -> _Client:
        self._stats["connections"] += 1
        peer = _peer_of(client, address)
        local = local_address(client) if self._guard is not None else ""
        scheme = "https" if isinstance(client, TlsStream) else "http"
        return _Client(codec, port, host, address, next(_conn_ids), peer, local, scheme)

    # -- one request (stream) ----------------------------------------------------------------

    async def _request(self, down: ClientStream, client: _Client) -> None:
        started = trio.current_time()
        entry = RequestLog(
            method="-",
            authority="-",
            path="-",
            connection_id=client.conn_id,
            downstream_address=client.peer,
        )
        cancel = trio.CancelScope()
        down.on_fail = cancel.cancel  # the client reset the stream (or left): stop everything
        reply = _Replier(down, entry, grpc=False)
        # Stream idle timeout (Envoy's, 5 min): no DATA either way for that long ends the
        # request; every payload moved (both sides' streams) pushes the deadline.
        idle_s = self.limits.stream_idle_timeout
        idle = trio.CancelScope(deadline=started + idle_s)
        pushed = [started]

        def touch() -> None:
            now = trio.current_time()
            if now - pushed[0] > idle_s / 100:  # moving a deadline costs: only when it lags
                pushed[0] = now
                idle.deadline = now + idle_s

        down.on_activity = reply.touch = touch
        try:
            with cancel, idle:
                assert down.headers is not None
                try:
                    head = parse_request(down.headers)
                except BadRequest as exc:
                    entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
                    await reply.local(400, str(exc).encode())
                    return
                entry.method, entry.authority, entry.path = head.method, head.authority, head.path
                entry.request_id = head.header("x-request-id") or new_request_id()
                reply.grpc = head.grpc
                if head.grpc:
                    entry.protocol = "grpc"
                await self._route(down, head, reply, entry, client)
            if idle.cancelled_caught:
                entry.flags.append(flags.STREAM_IDLE_TIMEOUT)
                await reply.local(408, b"stream timeout")  # or a reset once a head went out
            elif cancel.cancelled_caught or (down.error and down.on_fail is not None):
                entry.flags.append(flags.DOWNSTREAM_TERMINATION)
                if not reply.head_sent:
                    entry.code = 0
        except StreamReset:
            entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            if not reply.head_sent:
                entry.code = 0
        except Exception as exc:
            # One request's bug (or an error from a nursery, as an ExceptionGroup) ends that
            # stream, never the client's connection or the pod's proxy.
            if down.error and down.on_fail is not None:
                entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            else:
                log.error("request.failed", path=entry.path, error=repr(exc), exc_info=exc)
            down.reset()
            if not reply.head_sent:
                entry.code = 0
        finally:
            # The client's reset or its connection's end (our own reset clears `on_fail`).
            gone = down.error and down.on_fail is not None
            if gone and flags.DOWNSTREAM_TERMINATION not in entry.flags:
                entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            entry.bytes_received = down.received_bytes
            entry.bytes_sent = down.sent_bytes
            self._recorder.finish(entry, started)

    async def _route(
        self,
        down: ClientStream,
        head: RequestHead,
        reply: _Replier,
        entry: RequestLog,
        client: _Client,
    ) -> None:
        request = routing_request(head, port=client.port, host=client.host)
        if client.scheme != request.scheme:  # matches on `scheme`, x-forwarded-proto see it
            request = dataclasses.replace(request, scheme=client.scheme)
        token: Token[TraceContext | None] | None = None
        if self._tracer is not None:
            raw = [(k, v) for k, v in down.headers or [] if not k.startswith(b":")]
            token = start_span_for(self._tracer, raw, entry, request)
        try:
            await self._route_request(down, head, request, reply, entry, client)
        finally:
            if token is not None:
                CURRENT_TRACE.reset(token)

    async def _route_request(
        self,
        down: ClientStream,
        head: RequestHead,
        request: HttpRequest,
        reply: _Replier,
        entry: RequestLog,
        client: _Client,
    ) -> None:
        refusal = None
        if self._guard is not None:
            request, fields, refusal = await guard_request(
                self._guard,
                request,
                head.headers,
                entry,
                port=client.port,
                source_ip=client.address or "",
                destination_ip=client.local,
            )
            if refusal is None and fields is not head.headers:
                head = dataclasses.replace(head, headers=fields, path=request.target)
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
            decision = RouteDecision(kind="direct", direct=DirectResponse(500, b"routing failed"))
        entry.route_name = decision.route_name
        if decision.kind == "route" and decision.fault.delay > 0:
            entry.flags.append(flags.DELAY_INJECTED)
            await trio.sleep(decision.fault.delay)
        if decision.kind == "no_route":
            entry.flags.append(flags.NO_ROUTE)
            await reply.local(404, b"")
            return
        if decision.kind == "redirect" and decision.redirect is not None:
            extra = [("location", decision.redirect.location)]
            await reply.local(decision.redirect.status, b"", extra, decision.response_headers)
            return
        if decision.kind == "direct" and decision.direct is not None:
            direct = decision.direct
            await reply.local(direct.status, direct.body, (), decision.response_headers)
            return
        dest = decision.chosen
        if dest is not None and dest.error is None and dest.service is not None:
            entry.upstream_cluster = dest.name  # an aborted request still names its service
        fault = decision.fault
        if fault.abort_grpc_status is not None:
            entry.flags.append(flags.FAULT_INJECTED)
            await reply.grpc_error(fault.abort_grpc_status, "fault filter abort")
            return
        if fault.abort_status is not None:
            entry.flags.append(flags.FAULT_INJECTED)
            await reply.local(fault.abort_status, b"fault filter abort")
            return
        if dest is None or dest.error is not None or dest.service is None or dest.port is None:
            entry.upstream_cluster = None
            entry.flags.append(flags.NO_CLUSTER)
            await reply.local(503, b"no cluster for the route's destination")
            return
        source_ns = source.namespace if source is not None else None
        await self._forward(down, head, request, decision, dest, reply, entry, client, source_ns)

    async def _forward(
        self,
        down: ClientStream,
        head: RequestHead,
        request: HttpRequest,
        decision: RouteDecision,
        dest: RouteDestination,
        reply: _Replier,
        entry: RequestLog,
        client: _Client,
        source_ns: str | None,
    ) -> None:
        assert dest.service is not None
        assert dest.port is not None
        snapshot = self._snapshot()
        cluster = self.registry.picker_for(
            snapshot, dest.service, dest.subset, dest.port, from_namespace=source_ns or None
        )
        headers = upstream_headers(
            head,
            request,
            decision,
            request_id=entry.request_id,
            trace_headers=entry.trace_headers,
            client_address=client.address,
        )
        upstreams = self._upstreams[upstream_codec(destination_port(dest), client.codec)]
        grpc_timeout = parse_grpc_timeout(head.header("grpc-timeout")) if reply.grpc else None
        limits = [t for t in (decision.timeout, grpc_timeout) if t is not None]
        deadline = trio.current_time() + min(limits) if limits else math.inf
        ctx = PickContext(headers=request.headers, source_ip=client.address, path=request.target)
        body = RequestBody(down, limit=self.limits.retry_buffer_bytes)
        length = head.header("content-length")
        local: LocalReply | None = None
        reset: StreamReset | None = None
        async with trio.open_nursery() as pumps:
            exchange = _Exchange(cluster, dest.port, headers, body, pumps, reply.touch)
            exchange.upstreams = upstreams
            exchange.content_length = length.encode("latin-1") if length else None
            exchange.grpc = reply.grpc
            with trio.CancelScope(deadline=deadline) as overall:
                try:
                    result = await run_attempts(
                        cluster,
                        ctx,
                        decision,
                        entry,
                        attempt=exchange.attempt,
                        replayable=lambda: body.replayable,
                        discard=exchange.discard,
                        grpc_timeout=grpc_timeout,
                    )
                    if isinstance(result, LocalReply):
                        local = result
                    else:
                        try:
                            await exchange.respond(down, reply, decision.response_headers, entry)
                        finally:
                            if result.finish is not None:
                                result.finish(_stream_outcome(entry))
                except StreamReset as exc:
                    reset = exc  # the client's side failed: raised below, not in a group
            await exchange.drop()
        if reset is not None:
            raise reset
        if local is not None:
            timed_out = flags.UPSTREAM_TIMEOUT in entry.flags
            await reply.local(local.status, local.body, timed_out=timed_out)
        elif overall.cancelled_caught:  # the route timeout (or grpc-timeout) cut the stream
            entry.flags.append(flags.UPSTREAM_TIMEOUT)
            await reply.timed_out()
        elif decision.mirror is not None and body.whole:
            # the answered request's copy, sent beside (never before) the client's answer
            shadow = decision.mirror
            to = self._upstreams[upstream_codec(destination_port(shadow), client.codec)]
            self.pool.spawn(partial(self._mirror, to, snapshot, shadow, headers, list(body.kept)))

    async def _mirror(
        self,
        upstreams: Upstreams,
        snapshot: Snapshot,
        dest: RouteDestination,
        headers: Headers,
        chunks: list[bytes],
    ) -> None:
        sent = None
        with trio.move_on_after(self.limits.mirror_timeout):
            sent = await mirror(upstreams, self.registry, snapshot, dest, headers, chunks)
        if sent is not False:  # sent, or timed out after sending
            self._stats["mirrored"] += 1


class Http1Bridge:
    """`nodeagent.http.bridge.Bridge` over an `H2Proxy`: an `HttpProxy`'s request whose
    destination port's upstream is HTTP/2 (`selection.upstream_codec`) goes through it."""

    def __init__(self, proxy: H2Proxy) -> None:
        self.proxy = proxy
        self.forward = proxy.forward_http1

    def takes(self, dest: RouteDestination) -> bool:
        return upstream_codec(destination_port(dest), "http1") == "h2"


def _stream_outcome(entry: RequestLog) -> Outcome | None:
    """How a streamed gRPC answer counts for outlier detection, once it ended: its trailers'
    `grpc-status` (Envoy's grpcToHttpStatus), a reset of the upstream's as a gateway error,
    else (the client left, the route timeout) what its head said."""
    if flags.UPSTREAM_RESET in entry.flags:
        return Outcome.GATEWAY_ERROR
    if entry.grpc_status is not None and flags.UPSTREAM_TIMEOUT not in entry.flags:
        return Outcome.from_status(grpc_to_http_status(entry.grpc_status))
    return None


class RequestBody:
    """The client's request body as the attempts send it: streamed, and kept (for a retry's
    replay) while it fits `limit`."""

    def __init__(self, down: ClientStream, *, limit: int) -> None:
        self.down = down
        self.limit = limit
        self.kept: list[bytes] = []
        self.size = 0
        self.replayable = True
        self.complete = False

    @property
    def whole(self) -> bool:
        """All of the body was read and is kept (a mirror can send the same request)."""
        return self.replayable and (self.complete or self.down.ended)

    async def pump(self, up: UpstreamStream) -> None:
        """Send what is kept, then the rest as it comes; END_STREAM (or trailers) at its end."""
        try:
            for chunk in list(self.kept):
                await up.send_data(chunk)
            while not self.complete:
                data = await self.down.receive_data()
                if not data:
                    self.complete = True
                    break
                if self.replayable:
                    if self.size + len(data) <= self.limit:
                        self.kept.append(data)
                        self.size += len(data)
                    else:
                        self.replayable = False
                        self.kept.clear()
                await up.send_data(data)
            await up.finish(self.down.trailers)
        except StreamReset:
            pass  # either side's reset: the response side (or the request's scope) handles it


class _Exchange:
    """The attempts of one request: the upstream stream of the current one, its body pump."""

    def __init__(
        self,
        cluster: Cluster,
        service_port: int,
        headers: Headers,
        body: RequestBody,
        pumps: trio.Nursery,
        touch: Callable[[], None] | None,
    ) -> None:
        self.touch = touch
        self.grpc = False
        self.upstreams: Upstreams | None = None  # the codec the destination port declares
        self.content_length: bytes | None = None
        self.cluster = cluster
        self.service_port = service_port
        self.headers = headers
        self.body = body
        self.pumps = pumps
        self.up: UpstreamStream | None = None
        self.pump_scope: trio.CancelScope | None = None

    async def attempt(self, handle: EndpointState, per_try_timeout: float | None) -> AttemptOutcome:
        assert self.upstreams is not None
        # A request without a body (a GET, all of its head on one frame) goes out whole:
        # END_STREAM on the head, no pump.
        body = self.body
        bodiless = not body.kept and (body.complete or body.down.ended) and not body.down.trailers
        facts = RequestFacts(end_stream=bodiless, content_length=self.content_length)
        try:
            opened = await self.upstreams.open(
                handle.endpoint, self.service_port, self.headers, facts, self.cluster
            )
        except UpstreamOverflow as exc:
            return AttemptOutcome("overflow", detail=str(exc))
        except UpstreamDenied as exc:
            return AttemptOutcome("denied", detail=str(exc))
        except UpstreamTlsError as exc:
            return AttemptOutcome("connect-failure", detail=str(exc), tls_failure=exc.reason)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            return AttemptOutcome("connect-failure", detail=str(exc))
        except StreamReset as exc:
            return AttemptOutcome("reset", stale=exc.refused, detail=str(exc))
        setup = opened.setup_s
        self.up = up = opened.stream
        up.on_activity = self.touch
        if not bodiless:
            self.pump_scope = scope = trio.CancelScope()
            self.pumps.start_soon(self._pump, up, scope)
        with trio.move_on_after(per_try_timeout or math.inf) as per_try:
            try:
                raw = await up.wait_headers()
            except StreamReset as exc:
                await self.drop()
                return AttemptOutcome("reset", stale=exc.refused, detail=str(exc), setup_s=setup)
        if per_try.cancelled_caught:
            await self.drop()
            return AttemptOutcome("timeout", setup_s=setup)
        status = next((int(v) for k, v in raw if k == b":status" and v.isdigit()), 0)
        grpc_status = grpc_status_of(raw)
        return AttemptOutcome(
            "response",
            status=status,
            grpc_status=grpc_status,
            setup_s=setup,
            # a gRPC answer with a body: its status comes in the trailers (`_forward`)
            defer_finish=self.grpc and grpc_status is None and not up.ended,
        )

    async def _pump(self, up: UpstreamStream, scope: trio.CancelScope) -> None:
        with scope:
            await self.body.pump(up)

    async def discard(self, outcome: AttemptOutcome) -> None:
        await self.drop()
        await trio.lowlevel.checkpoint()

    async def drop(self) -> None:
        """Stop the current attempt: its pump, its upstream stream (reset if still open; an
        HTTP/1.1 upstream's connection back to its pool after a clean exchange)."""
        if self.pump_scope is not None:
            self.pump_scope.cancel()
            self.pump_scope = None
        up, self.up = self.up, None
        if up is not None:
            await up.aclose()

    async def respond(
        self, down: ClientStream, reply: _Replier, ops: HeaderOps, entry: RequestLog
    ) -> None:
        """Stream the answer of the attempt that got one: head, DATA, trailers."""
        up = self.up
        assert up is not None
        assert up.headers is not None
        status, head = response_head(up.headers, ops)
        entry.code = status
        reply.head_sent = True
        await relay_response(up, down, head, entry)


class _Replier:
    """Answers the client: a local answer (plain, or a gRPC error for a gRPC client) or the
    upstream's head; says whether a head went out already."""

    def __init__(self, down: ClientStream, entry: RequestLog, *, grpc: bool) -> None:
        self.down = down
        self.entry = entry
        self.grpc = grpc
        self.head_sent = False
        self.touch: Callable[[], None] | None = None  # pushes the request's idle deadline

    def send_head(self, head: Headers, *, end_stream: bool) -> None:
        self.down.send_headers(head, end_stream=end_stream)
        self.head_sent = True

    async def grpc_error(self, status: int, message: str) -> None:
        self.entry.code = 200
        self.entry.grpc_status = status
        self.send_head(grpc_reply(status, message), end_stream=True)
        await trio.lowlevel.checkpoint()

    async def local(
        self,
        status: int,
        body: bytes,
        extra: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
        ops: HeaderOps = NO_OPS,
        *,
        timed_out: bool = False,
    ) -> None:
        if self.head_sent:
            self.down.reset()
            return
        if self.grpc and status >= 400:
            grpc_status = http_to_grpc_status(status, timed_out=timed_out)
            await self.grpc_error(grpc_status, body.decode("utf-8", "replace") or str(status))
            return
        self.entry.code = status
        head = plain_reply(status, body, extra)
        if ops:
            status_pair, rest = head[0], head[1:]
            text = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in rest]
            head = [status_pair] + [(k.encode(), v.encode()) for k, v in ops.apply(text)]
        self.send_head(head, end_stream=not body)
        if body:
            await self.down.send_data(body, end_stream=True)

    async def timed_out(self) -> None:
        """The route timeout passed while the response was streaming (or before any)."""
        if not self.head_sent:
            await self.local(504, b"upstream request timeout", timed_out=True)
        elif self.grpc:
            # A gRPC client hears why its stream ended: DEADLINE_EXCEEDED in the trailers.
            with contextlib.suppress(StreamReset):
                status = str(int(GrpcStatus.DEADLINE_EXCEEDED)).encode()
                self.down.send_trailers(
                    [(b"grpc-status", status), (b"grpc-message", b"upstream request timeout")]
                )
            self.entry.grpc_status = GrpcStatus.DEADLINE_EXCEEDED
        else:
            self.down.reset()
