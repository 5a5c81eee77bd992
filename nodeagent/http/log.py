"""One record per request (`RequestLog`), and finishing it: the span, the counters, the log line
and the `on_request` hook (metrics and the access log live behind that hook)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextvars import Token
from dataclasses import dataclass, field

import h11
import trio

from nodeagent.log import get_logger
from nodeagent.routing import HttpRequest
from nodeagent.telemetry.tracing import (
    CURRENT_TRACE,
    ActiveSpan,
    HeaderSeq,
    SpanEndpoint,
    TraceContext,
    Tracer,
    incoming_b3,
    inject,
)

log = get_logger("http.proxy")

_CODE_KEYS = {n: f"code_{n}xx" for n in range(6)}


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
    downstream_address: str = ""  # the client's "ip:port", when the proxy knows it
    upstream_transport_failure_reason: str = ""  # why TLS origination failed (Envoy's name)
    trace_id: str = ""  # set when the proxy has a tracer
    response_code_details: str = ""  # why a local answer (e.g. the RBAC policy that denied)
    policy: str = ""  # the AuthorizationPolicy that denied the request (ns/name)
    request_principal: str = ""  # <iss>/<sub> of the request's verified JWT
    protocol: str = "http"  # request_protocol: "grpc" for a gRPC request (HTTP/2 proxy)
    grpc_status: int | None = None  # a gRPC request's grpc-status
    span: ActiveSpan | None = field(default=None, repr=False)
    trace_headers: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def response_flags(self) -> str:
        return ",".join(self.flags) if self.flags else "-"


def entry_for(req: h11.Request, conn_id: int) -> RequestLog:
    """The record of a request whose head h11 parsed."""
    last = {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers}
    return RequestLog(
        method=req.method.decode("latin-1"),
        authority=last.get("host", ""),
        path=req.target.decode("latin-1"),
        request_id=last.get("x-request-id", ""),
        connection_id=conn_id,
    )


def start_span(
    tracer: Tracer, req: h11.Request, entry: RequestLog, request: HttpRequest
) -> Token[TraceContext | None]:
    """The CLIENT span of this request (continuing the caller's trace); its context goes
    upstream in the headers and, through CURRENT_TRACE, in a new tunnel's header."""
    return start_span_for(tracer, req.headers, entry, request)


def start_span_for(
    tracer: Tracer, headers: HeaderSeq, entry: RequestLog, request: HttpRequest
) -> Token[TraceContext | None]:
    """`start_span` from the request's header pairs (bytes, lower-case names), whatever the
    protocol (the HTTP/2 proxy's streams too)."""
    span = tracer.start(headers, kind="CLIENT", name=f"{request.authority_host}:{request.port}/*")
    if span.sampled:  # tags only for a span that is exported (1% by default): less per request
        span.span.tags.update(
            {
                "http.method": entry.method,
                "http.url": f"http://{request.authority}{entry.path}",
                "guid:x-request-id": entry.request_id,
                "component": "proxy",
            }
        )
    entry.span, entry.trace_id = span, span.trace_id
    entry.trace_headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in inject([], span.context, incoming_b3(headers))
    ]
    return CURRENT_TRACE.set(span.context)


def start_server_span(
    tracer: Tracer,
    headers: HeaderSeq,
    entry: RequestLog,
    *,
    name: str,
    local_ip: str,
    remote_ip: str,
    peer_principal: str | None,
) -> list[tuple[str, str]]:
    """The destination's SERVER span of a request (the child of the source's CLIENT span
    through `traceparent`), whatever the protocol; returns the trace headers that carry its
    context to the app."""
    span = tracer.start(
        headers,
        kind="SERVER",
        name=name,
        local=SpanEndpoint(tracer.service_name, local_ip),
        remote=SpanEndpoint(None, remote_ip),
    )
    if span.sampled:
        span.span.tags.update(
            {
                "http.method": entry.method,
                "http.url": f"http://{entry.authority}{entry.path}",
                "guid:x-request-id": entry.request_id,
                "peer.principal": peer_principal or "-",
                "component": "proxy",
            }
        )
    entry.span, entry.trace_id = span, span.trace_id
    return [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in inject([], span.context, incoming_b3(headers))
    ]


def _transport_failure(entry: RequestLog) -> dict[str, str]:
    """The TLS origination failure reason, only on the lines that have one."""
    reason = entry.upstream_transport_failure_reason
    return {"upstream_transport_failure_reason": reason} if reason else {}


class RequestRecorder:
    """Finishes every request of one proxy: span, counters, one log line, the hook.

    `quiet`: the hook writes the access-log line, so the proxy's own `request.complete` line
    drops to debug (one line per request, not two).
    """

    def __init__(
        self, name: str, on_request: Callable[[RequestLog], None] | None, *, quiet: bool
    ) -> None:
        self.name = name
        self.stats: Counter[str] = Counter()
        self._on_request = on_request
        self._quiet = quiet

    def finish(self, entry: RequestLog, started: float) -> None:
        entry.duration = trio.current_time() - started
        span = entry.span
        if span is not None:
            tags = None
            if span.sampled:  # an unsampled span is dropped: its tags would be work for nothing
                tags = {"response_flags": entry.response_flags}
                if entry.upstream_cluster:
                    tags["upstream_cluster"] = entry.upstream_cluster
                if entry.upstream:
                    tags["upstream_host"] = entry.upstream
            span.finish(status_code=entry.code, tags=tags)
        stats = self.stats
        stats["requests"] += 1
        stats[_CODE_KEYS.get(entry.code // 100) or f"code_{entry.code // 100}xx"] += 1
        for f in entry.flags:
            stats[f"flag_{f}"] += 1
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
            **_transport_failure(entry),
        )
        if self._on_request is not None:
            try:
                self._on_request(entry)
            except Exception as exc:  # a broken metrics hook must not break traffic
                log.warning("request.hook_failed", error=repr(exc))
