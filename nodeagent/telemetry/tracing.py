"""Tracing: W3C trace context and B3 propagation, x-request-id, spans, and a Zipkin v2 exporter.

Header handling is sans-IO: functions on h11-style header lists (`[(b"name", b"value"), …]`,
lower-case names). A proxied request gets one span per agent: the source agent records a CLIENT
span (child of whatever the application sent), the destination agent a SERVER span (child of that
CLIENT span), and each passes its own span id downstream as the parent. Sampling follows the
caller's decision when there is one, otherwise a rate applied to the trace id, so both agents of
a request decide alike. Finished spans go to `ZipkinExporter`, which batches them on a bounded
queue and POSTs Zipkin v2 JSON with the shared `nodeagent.httpclient`, counting failures and
drops, never blocking a request.

Why one module of ~570 lines: propagation, sampling, spans and the exporter are one vocabulary
(trace ids, span ids, the sampling flag) that every part reads; the hot path is only the
propagation functions at the top.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import trio

from nodeagent.httpclient import HttpClientError, HttpConnection
from nodeagent.log import get_logger

log = get_logger("telemetry.tracing")

Headers = list[tuple[bytes, bytes]]
HeaderSeq = Sequence[tuple[bytes, bytes]]
Kind = Literal["CLIENT", "SERVER"]
B3Style = Literal["single", "multi"]

MAX_TRACESTATE = 512
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_HEX16_32 = re.compile(r"(?:[0-9a-f]{16}|[0-9a-f]{32})\Z")
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
    r"(?P<rest>-.*)?\Z"
)
_ZERO32 = "0" * 32
_ZERO16 = "0" * 16

TRACE_HEADERS = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A position in a trace: `span_id` is the span the next hop is a child of."""

    trace_id: str  # 32 lower-case hex digits (a 64-bit B3 id is left-padded)
    span_id: str  # 16 lower-case hex digits
    sampled: bool | None = None  # None: the caller left the decision to us
    parent_id: str | None = None
    debug: bool = False
    tracestate: str | None = None


def new_trace_id() -> str:
    # Identifiers, not secrets: `random` is ~10x cheaper than `secrets` (no os.urandom syscall).
    # An all-zero id is invalid (W3C, B3); `or 1` rules it out.
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def _get(headers: HeaderSeq, name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return None


# -- W3C trace context ---------------------------------------------------------------------------


def parse_traceparent(value: str) -> TraceContext | None:
    """The context in a `traceparent` value, or None when it is malformed (then ignored, as the
    spec says: the request starts a new trace)."""
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version = m.group("version")
    if version == "ff" or (version == "00" and m.group("rest") is not None):
        return None
    trace, span = m.group("trace"), m.group("span")
    if trace == _ZERO32 or span == _ZERO16:
        return None
    return TraceContext(trace, span, sampled=bool(int(m.group("flags"), 16) & 1))


def format_traceparent(ctx: TraceContext) -> str:
    return f"00-{ctx.trace_id}-{ctx.span_id}-{'01' if ctx.sampled else '00'}"


# -- B3 ------------------------------------------------------------------------------------------


def _b3_sampled(flag: str | None) -> tuple[bool | None, bool]:
    if flag is None:
        return None, False
    if flag == "d":
        return True, True
    if flag in ("1", "true"):
        return True, False
    if flag in ("0", "false"):
        return False, False
    raise ValueError(flag)


def _pad(trace_id: str) -> str:
    return trace_id.rjust(32, "0")


def parse_b3_single(value: str) -> TraceContext | None:
    """`b3: {trace}-{span}[-{sampled}[-{parent}]]` or a lone sampling flag (`b3: 0`), which
    carries no ids and so yields None here (see `sampling_only`)."""
    parts = value.strip().lower().split("-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    trace, span = parts[0], parts[1]
    if not _HEX16_32.match(trace) or not _HEX16.match(span):
        return None
    try:
        sampled, debug = _b3_sampled(parts[2] if len(parts) > 2 else None)
    except ValueError:
        return None
    parent = parts[3] if len(parts) > 3 else None
    if parent is not None and not _HEX16.match(parent):
        return None
    if set(trace) == {"0"} or span == _ZERO16:
        return None
    return TraceContext(_pad(trace), span, sampled, parent, debug)


def parse_b3_multi(headers: HeaderSeq) -> TraceContext | None:
    trace = (_get(headers, b"x-b3-traceid") or "").lower()
    span = (_get(headers, b"x-b3-spanid") or "").lower()
    if not _HEX16_32.match(trace) or not _HEX16.match(span) or set(trace) == {"0"}:
        return None
    if span == _ZERO16:
        return None
    parent = _get(headers, b"x-b3-parentspanid")
    if parent is not None:
        parent = parent.lower()
        if not _HEX16.match(parent):
            parent = None
    debug = _get(headers, b"x-b3-flags") == "1"
    try:
        sampled, _ = _b3_sampled(_get(headers, b"x-b3-sampled"))
    except ValueError:
        sampled = None
    if debug:
        sampled = True
    return TraceContext(_pad(trace), span, sampled, parent, debug)


def format_b3_single(ctx: TraceContext) -> str:
    flag = "d" if ctx.debug else ("1" if ctx.sampled else "0")
    value = f"{ctx.trace_id}-{ctx.span_id}-{flag}"
    return f"{value}-{ctx.parent_id}" if ctx.parent_id else value


def b3_multi_headers(ctx: TraceContext) -> Headers:
    out: Headers = [
        (b"x-b3-traceid", ctx.trace_id.encode()),
        (b"x-b3-spanid", ctx.span_id.encode()),
    ]
    if ctx.parent_id:
        out.append((b"x-b3-parentspanid", ctx.parent_id.encode()))
    if ctx.debug:
        out.append((b"x-b3-flags", b"1"))
    else:
        out.append((b"x-b3-sampled", b"1" if ctx.sampled else b"0"))
    return out


# -- extraction and injection --------------------------------------------------------------------


def extract(headers: HeaderSeq) -> TraceContext | None:
    """The caller's trace context: W3C first, then B3 single, then B3 multi."""
    tp = _get(headers, b"traceparent")
    if tp is not None:
        ctx = parse_traceparent(tp)
        if ctx is not None:
            state = _get(headers, b"tracestate")
            if state and len(state) <= MAX_TRACESTATE:
                ctx = replace(ctx, tracestate=state)
            return ctx
    single = _get(headers, b"b3")
    if single is not None:
        ctx = parse_b3_single(single)
        if ctx is not None:
            return ctx
    return parse_b3_multi(headers)


def sampling_only(headers: HeaderSeq) -> bool | None:
    """A sampling decision sent without ids (`b3: 0` / `x-b3-sampled: 0`), else None."""
    single = _get(headers, b"b3")
    if single in ("0", "1", "d"):
        return single != "0"
    try:
        return _b3_sampled(_get(headers, b"x-b3-sampled"))[0]
    except ValueError:
        return None


def inject(headers: HeaderSeq, ctx: TraceContext, b3: B3Style | None = "multi") -> Headers:
    """`headers` without any tracing header, plus `ctx` as traceparent/tracestate and B3."""
    out = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
    out.append((b"traceparent", format_traceparent(ctx).encode()))
    if ctx.tracestate:
        out.append((b"tracestate", ctx.tracestate.encode("latin-1")))
    if b3 == "single":
        out.append((b"b3", format_b3_single(ctx).encode()))
    elif b3 == "multi":
        out.extend(b3_multi_headers(ctx))
    return out


def ensure_request_id(headers: HeaderSeq) -> tuple[Headers, str]:
    """The headers with an `x-request-id` (a new UUID4 when absent or empty), and that id."""
    existing = _get(headers, b"x-request-id")
    if existing:
        return list(headers), existing
    rid = str(uuid.uuid4())
    return [*((k, v) for k, v in headers if k.lower() != b"x-request-id"),
            (b"x-request-id", rid.encode())], rid  # fmt: skip


# -- spans ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpanEndpoint:
    service_name: str | None = None
    ip: str | None = None
    port: int | None = None

    def to_zipkin(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.service_name:
            out["serviceName"] = self.service_name
        if self.ip:
            out["ipv6" if ":" in self.ip else "ipv4"] = self.ip
        if self.port:
            out["port"] = self.port
        return out


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: Kind
    start_us: int
    duration_us: int = 0
    local: SpanEndpoint = field(default_factory=SpanEndpoint)
    remote: SpanEndpoint | None = None
    tags: dict[str, str] = field(default_factory=dict)
    debug: bool = False

    def to_zipkin(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "traceId": self.trace_id,
            "id": self.span_id,
            "name": self.name,
            "kind": self.kind,
            "timestamp": self.start_us,
            "duration": max(1, self.duration_us),
            "localEndpoint": self.local.to_zipkin(),
            "tags": dict(self.tags),
        }
        if self.parent_id:
            out["parentId"] = self.parent_id
        if self.remote is not None:
            out["remoteEndpoint"] = self.remote.to_zipkin()
        if self.debug:
            out["debug"] = True
        return out


class ActiveSpan:
    """A span being timed; `context` is what the next hop must see as its parent."""

    def __init__(self, tracer: Tracer, span: Span, ctx: TraceContext, sampled: bool) -> None:
        self._tracer = tracer
        self.span = span
        self.context = ctx
        self.sampled = sampled
        self._finished = False

    @property
    def trace_id(self) -> str:
        return self.span.trace_id

    def downstream_headers(self, headers: HeaderSeq, b3: B3Style | None = "multi") -> Headers:
        return inject(headers, self.context, b3)

    def finish(self, *, status_code: int | None = None, tags: dict[str, str] | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        span = self.span
        span.duration_us = int(self._tracer.clock() * 1e6) - span.start_us
        if status_code is not None:
            span.tags["http.status_code"] = str(status_code)
            if status_code >= 500 or status_code == 0:
                span.tags["error"] = str(status_code)
        if tags:
            span.tags.update(tags)
        if self.sampled and self._tracer.exporter is not None:
            self._tracer.exporter.export(span)


class Tracer:
    """Starts spans for proxied requests. `sample_rate` in [0, 1] applies when the caller did
    not decide; `exporter` None records nothing (propagation still works)."""

    def __init__(
        self,
        service_name: str,
        *,
        sample_rate: float = 1.0,
        exporter: ZipkinExporter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sampling rate {sample_rate} is outside [0, 1]")
        self.service_name = service_name
        self.sample_rate = sample_rate
        self.exporter = exporter
        self.clock = clock

    def decide(self, trace_id: str) -> bool:
        # The low 64 bits of the trace id as a fraction: both agents of a request agree.
        return int(trace_id[-16:], 16) < self.sample_rate * 2**64

    def start(
        self,
        headers: HeaderSeq,
        *,
        kind: Kind,
        name: str,
        local: SpanEndpoint | None = None,
        remote: SpanEndpoint | None = None,
        tags: dict[str, str] | None = None,
    ) -> ActiveSpan:
        parent = extract(headers)
        if parent is None:
            trace_id, parent_id, debug, state = new_trace_id(), None, False, None
            forced = sampling_only(headers)
            sampled = self.decide(trace_id) if forced is None else forced
        else:
            trace_id, parent_id = parent.trace_id, parent.span_id
            debug, state = parent.debug, parent.tracestate
            sampled = self.decide(trace_id) if parent.sampled is None else parent.sampled
        span_id = new_span_id()
        span = Span(
            trace_id=trace_id,
            span_id=span_id,
            parent_id=parent_id,
            name=name,
            kind=kind,
            start_us=int(self.clock() * 1e6),
            local=local or SpanEndpoint(self.service_name),
            remote=remote,
            tags=dict(tags or {}),
            debug=debug,
        )
        ctx = TraceContext(trace_id, span_id, sampled, parent_id, debug, state)
        return ActiveSpan(self, span, ctx, sampled)


# -- Zipkin export -------------------------------------------------------------------------------


# An error response's body is read for the log line only; a collector's is a line or two.
MAX_ERROR_BODY = 4096


class ZipkinExporter:
    """Batches finished spans and POSTs them as Zipkin v2 JSON (`/api/v2/spans`)."""

    def __init__(
        self,
        url: str,
        *,
        max_queue: int = 2048,
        batch_size: int = 128,
        interval: float = 1.0,
        timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"zipkin collector URL {url!r}: need http://host[:port]/path")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = (parts.path or "/api/v2/spans") + (f"?{parts.query}" if parts.query else "")
        self.batch_size = batch_size
        self.interval = interval
        self.timeout = timeout
        self._send, self._receive = trio.open_memory_channel[Span](max_queue)
        self.exported = 0
        self.dropped = 0
        self.failed_batches = 0
        self.failed_spans = 0
        self.posted_batches = 0
        self._posted = trio.Event()

    def export(self, span: Span) -> None:
        """Queue a finished span; never blocks (full queue: dropped and counted)."""
        try:
            self._send.send_nowait(span)
        except trio.WouldBlock:
            self.dropped += 1

    def _take(self, limit: int) -> list[Span]:
        out: list[Span] = []
        while len(out) < limit:
            try:
                out.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return out

    async def flush(self) -> None:
        """Send everything queued now, in batches; failures are counted, not raised."""
        while batch := self._take(self.batch_size):
            await self._post(batch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            batch = [first, *self._take(self.batch_size - 1)]
            # Wait a little for company, so a burst goes out as one POST.
            with trio.move_on_after(self.interval):
                while len(batch) < self.batch_size:
                    batch.append(await self._receive.receive())
            await self._post(batch)

    async def wait_posted(self, batches: int) -> None:
        """Return once `batches` POSTs have finished (successfully or not)."""
        while self.posted_batches < batches:
            await self._posted.wait()

    async def _post(self, batch: list[Span]) -> None:
        try:
            await self._post_once(batch)
        finally:
            self.posted_batches += 1
            posted, self._posted = self._posted, trio.Event()
            posted.set()

    async def _post_once(self, batch: list[Span]) -> None:
        body = json.dumps([s.to_zipkin() for s in batch], separators=(",", ":")).encode()
        try:
            with trio.fail_after(self.timeout):
                status, detail = await self._request(body)
        except (HttpClientError, trio.TooSlowError) as exc:
            self._failed(batch, f"{type(exc).__name__}: {exc}")
            return
        if 200 <= status < 300:
            self.exported += len(batch)
        else:
            self._failed(batch, f"HTTP {status}" + (f": {detail}" if detail else ""))

    def _failed(self, batch: list[Span], why: str) -> None:
        self.failed_batches += 1
        self.failed_spans += len(batch)
        log.warning("zipkin.export_failed", url=self.url, spans=len(batch), error=why)

    async def _request(self, body: bytes) -> tuple[int, str]:
        """POST one batch on a fresh connection: (status, the start of an error response's body)."""
        conn = await HttpConnection.open(
            self.host,
            self.port,
            host_header=f"{self.host}:{self.port}",
            peer=f"zipkin collector {self.host}:{self.port}",
        )
        try:
            # one POST a second at most: a connection per batch keeps no state to go stale
            headers = [("Content-Type", "application/json"), ("Connection", "close")]
            await conn.send("POST", self.path, headers, body)
            status = await conn.read_head()
            if 200 <= status < 300:
                return status, ""  # the body says nothing more; the connection closes anyway
            try:
                detail = await conn.read_body(MAX_ERROR_BODY)
            except HttpClientError:
                detail = b""  # the status alone says it failed
            return status, detail[:200].decode("utf-8", "replace").strip()
        finally:
            await conn.aclose()

    def statistics(self) -> dict[str, int]:
        return {
            "exported": self.exported,
            "dropped": self.dropped,
            "failed_batches": self.failed_batches,
            "failed_spans": self.failed_spans,
            "queued": self._receive.statistics().current_buffer_used,
        }


# -- propagation beyond HTTP headers -------------------------------------------------------------

# The trace context of the request being proxied in the current task. The HTTP proxy sets it
# around forwarding; the tunnel connector reads it (the pool opens connections inside the
# request's task), so a new tunnel carries the CLIENT span's context to the destination agent.
CURRENT_TRACE: ContextVar[TraceContext | None] = ContextVar("nodeagent_trace", default=None)


def incoming_b3(headers: HeaderSeq) -> B3Style | None:
    """The B3 style the caller used (None: no B3 header, so only traceparent goes out)."""
    names = {k.lower() for k, _ in headers}
    if b"b3" in names:
        return "single"
    if names & {b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"x-b3-flags"}:
        return "multi"
    return None


def tunnel_trace(ctx: TraceContext | None) -> dict[str, str]:
    """The tunnel header's `trace` entries for `ctx` (W3C names, as in HTTP)."""
    if ctx is None:
        return {}
    out = {"traceparent": format_traceparent(ctx)}
    if ctx.tracestate:
        out["tracestate"] = ctx.tracestate
    return out


def tunnel_headers(trace: Mapping[str, str]) -> Headers | None:
    """The tunnel header's `trace` map as HTTP-style headers for `Tracer.start`, or None when
    it carries no valid trace context (a plain TCP connection: no span is recorded)."""
    tp = trace.get("traceparent")
    if tp is None or parse_traceparent(tp) is None:
        return None
    out: Headers = [(b"traceparent", tp.encode("latin-1"))]
    state = trace.get("tracestate")
    if state:
        out.append((b"tracestate", state.encode("latin-1")))
    return out
