"""The destination agent's HTTP/2 server: the h2c streams that arrived for this pod's HTTP/2 or
gRPC port (after the HBONE tunnel, or on 15006 under PERMISSIVE), as `nodeagent.http.inbound`
serves HTTP/1.1 ones.

The source agent already routed, retried and injected faults; here each stream is only parsed
(`messages.parse_request`), put through the injected `Guard` (RequestAuthentication, then L7
AuthorizationPolicy on :method, :path, :authority, the headers and the tunnel's verified
identity) and forwarded to the pod's own app port over HTTP/2: one upstream connection per
client connection (a second one only when the app's stream limit is reached, `H2Pool`), its
first one the connection the tunnel opened from the client's address. Bodies and trailers
stream both ways at once with flow control end to end (`relay.py`): nothing is buffered whole.
A refusal is answered here (`destination.local_answer`: gRPC clients get grpc-status 7 or 16),
flag UAEX and the deciding policy in `response_code_details`. Every stream gets a SERVER span,
one `RequestLog` (request_protocol grpc for a gRPC call, its grpc-status) and the
connection's `on_request` hook (reporter "destination" metrics and the access log).
"""

from __future__ import annotations

import itertools

import trio

from nodeagent.http import flags
from nodeagent.http.guard import Verdict
from nodeagent.http.guarded import ask_guard
from nodeagent.http.headers import new_request_id
from nodeagent.http.inbound import InboundConnection, InboundServer, Totals
from nodeagent.http.log import RequestLog, log, start_server_span
from nodeagent.http2.conn import H2Connection, H2Stream, StreamReset, close_when_idle
from nodeagent.http2.destination import destination_headers, local_answer
from nodeagent.http2.messages import BadRequest, RequestHead, parse_request, response_head
from nodeagent.http2.pool import H2Pool
from nodeagent.http2.relay import pump_request, relay_response
from nodeagent.routing import HeaderOps
from nodeagent.routing.grpc import is_grpc
from nodeagent.snapshot.model import Endpoint
from nodeagent.tunnel.goaway import DrainSet

_conn_ids = itertools.count(1)
_NO_OPS = HeaderOps()
_CONNECT_FAILURES = (OSError, trio.TooSlowError, trio.BrokenResourceError)


class InboundH2(InboundServer):
    """Serves the HTTP/2 connections of one pod's HTTP/2 and gRPC ports (destination mode)."""

    default_name = "inbound-h2"

    def _set_up(self) -> None:
        self._conns = DrainSet()

    def drain(self) -> None:
        """The agent drains: a graceful GOAWAY to every client connection (`H2Proxy.drain`)."""
        self._conns.drain()

    async def serve(
        self, client: trio.abc.Stream, inbound: InboundConnection, totals: Totals | None = None
    ) -> None:
        """Serve `client` (its preface not yet read) until it closes or has had no stream for
        `Limits.idle_timeout` (a GOAWAY then); closes it and the app connections. `totals`
        sums the streams' body bytes (the connection's TCP metrics)."""
        totals = totals if totals is not None else Totals()
        conn_id = next(_conn_ids)
        self._recorder.stats["connections"] += 1

        async def connect(_endpoint: Endpoint, _port: int) -> trio.abc.Stream:
            return await inbound.connect()

        pool = H2Pool(connect, connect_timeout=self.limits.connect_timeout)
        down = H2Connection(client, client=False)

        async def handle(stream: H2Stream) -> None:
            await self._stream(stream, pool, inbound, conn_id, totals)

        try:
            with self._conns.serving(down):
                async with trio.open_nursery() as nursery:
                    await nursery.start(pool.run)
                    nursery.start_soon(close_when_idle, down, self.limits.idle_timeout)
                    await down.run(handle)
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # the connection ends; the pod's proxy goes on
            log.error("connection.failed", proxy=self._recorder.name, error=repr(exc))
        finally:
            with trio.CancelScope(shield=True):
                await pool.aclose()

    async def _stream(
        self,
        down: H2Stream,
        pool: H2Pool,
        inbound: InboundConnection,
        conn_id: int,
        totals: Totals,
    ) -> None:
        started = trio.current_time()
        entry = RequestLog(
            method="-",
            authority="-",
            path="-",
            connection_id=conn_id,
            downstream_address=f"{inbound.source_ip}:{inbound.source_port}",
            upstream=f"{inbound.destination_ip}:{inbound.port}",
            upstream_cluster=f"inbound|{inbound.port}||",
        )
        cancel = trio.CancelScope()
        down.on_fail = cancel.cancel  # the client reset the stream (or left): stop everything
        grpc = is_grpc(_content_type(down))
        if grpc:
            entry.protocol = "grpc"
        try:
            with cancel:
                assert down.headers is not None
                try:
                    head = parse_request(down.headers)
                except BadRequest as exc:
                    entry.flags.append(flags.DOWNSTREAM_PROTOCOL_ERROR)
                    await _answer(down, entry, 400, str(exc).encode(), grpc=grpc)
                    return
                await self._handle(down, head, pool, inbound, entry, grpc=grpc)
        except StreamReset:
            entry.flags.append(flags.DOWNSTREAM_TERMINATION)
        except Exception as exc:
            # One stream's bug ends that stream, never the client's connection or the pod's.
            log.error("request.failed", path=entry.path, error=repr(exc), exc_info=exc)
            down.reset()
        finally:
            gone = down.error and down.on_fail is not None  # the client's reset, not ours
            if gone and flags.DOWNSTREAM_TERMINATION not in entry.flags:
                entry.flags.append(flags.DOWNSTREAM_TERMINATION)
            entry.bytes_received = down.received_bytes
            entry.bytes_sent = down.sent_bytes
            totals.received += entry.bytes_received
            totals.sent += entry.bytes_sent
            self._finish(entry, started, inbound)

    async def _handle(
        self,
        down: H2Stream,
        head: RequestHead,
        pool: H2Pool,
        inbound: InboundConnection,
        entry: RequestLog,
        *,
        grpc: bool,
    ) -> None:
        entry.method, entry.authority, entry.path = head.method, head.authority, head.path
        entry.request_id = head.header("x-request-id") or new_request_id()
        trace_headers: list[tuple[str, str]] = []
        if self._tracer is not None:
            raw = [(k, v) for k, v in down.headers or [] if not k.startswith(b":")]
            trace_headers = start_server_span(
                self._tracer,
                raw,
                entry,
                name=inbound.span_name or f"{head.authority}:{inbound.port}/*",
                local_ip=inbound.destination_ip,
                remote_ip=inbound.source_ip,
                peer_principal=inbound.source_identity,
            )
        facts = inbound.facts(head.method, head.path, head.authority, head.headers)
        verdict = await ask_guard(self._guard, facts, entry)
        if not verdict.allowed:
            await _answer(down, entry, verdict.status, verdict.body, grpc=grpc)
            return
        await self._forward(down, head, pool, inbound, entry, verdict, trace_headers)

    async def _forward(
        self,
        down: H2Stream,
        head: RequestHead,
        pool: H2Pool,
        inbound: InboundConnection,
        entry: RequestLog,
        verdict: Verdict,
        trace_headers: list[tuple[str, str]],
    ) -> None:
        headers = destination_headers(
            head,
            xfcc=inbound.xfcc,
            remove=verdict.remove_headers,
            add=verdict.add_headers,
            strip_params=verdict.strip_params,
            trace_headers=trace_headers,
        )
        grpc = entry.protocol == "grpc"
        try:
            conn, _reused = await pool.acquire(
                Endpoint(inbound.destination_ip, inbound.port), inbound.port
            )
        except _CONNECT_FAILURES:
            entry.flags.append(flags.UPSTREAM_CONNECT_FAILURE)
            await _answer(down, entry, 503, b"upstream connect error", grpc=grpc)
            return
        entry.attempts = 1
        bodiless = down.ended and not down.trailers  # all of it on the head: END_STREAM there
        try:
            up = conn.open_stream(headers, end_stream=bodiless)
        except StreamReset:
            entry.flags.append(flags.UPSTREAM_RESET)
            await _answer(down, entry, 503, b"upstream connect error", grpc=grpc)
            return
        reset: StreamReset | None = None  # the client's side failed: raised as itself below
        try:
            async with trio.open_nursery() as pumps:
                if not bodiless:
                    pumps.start_soon(pump_request, down, up)
                try:
                    await _respond(down, up, entry, grpc=grpc)
                except StreamReset as exc:
                    reset = exc
                pumps.cancel_scope.cancel()  # answered: the rest of the request is not needed
        finally:
            up.close()
        if reset is not None:
            raise reset


async def _respond(down: H2Stream, up: H2Stream, entry: RequestLog, *, grpc: bool) -> None:
    """The app's answer to the client, or 503 (gRPC UNAVAILABLE) when it reset the stream
    before a head. Raises StreamReset when the client's stream failed."""
    try:
        await up.wait_headers()
    except StreamReset:
        entry.flags.append(flags.UPSTREAM_RESET)
        await _answer(down, entry, 503, b"upstream reset before response headers", grpc=grpc)
        return
    assert up.headers is not None
    entry.code, response = response_head(up.headers, _NO_OPS)
    await relay_response(up, down, response, entry)


async def _answer(
    down: H2Stream, entry: RequestLog, status: int, body: bytes, *, grpc: bool
) -> None:
    """Answer the stream from here (`destination.local_answer`)."""
    head, data, grpc_status = local_answer(status, body, grpc=grpc)
    entry.code = 200 if grpc_status is not None else status
    entry.grpc_status = grpc_status
    down.send_headers(head, end_stream=not data)
    if data:
        await down.send_data(data, end_stream=True)
    else:
        await trio.lowlevel.checkpoint()


def _content_type(stream: H2Stream) -> str | None:
    for k, v in stream.headers or []:
        if k == b"content-type":
            return v.decode("latin-1")
    return None
