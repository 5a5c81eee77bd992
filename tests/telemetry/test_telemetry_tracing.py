"""Trace header parsing and propagation (W3C, B3 single/multi), request ids, sampling, spans."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.telemetry import tracing
from nodeagent.telemetry.tracing import TraceContext, Tracer

hex32 = st.text("0123456789abcdef", min_size=32, max_size=32).filter(lambda s: set(s) != {"0"})
hex16 = st.text("0123456789abcdef", min_size=16, max_size=16).filter(lambda s: set(s) != {"0"})
contexts = st.builds(
    TraceContext,
    trace_id=hex32,
    span_id=hex16,
    sampled=st.booleans(),
    parent_id=st.none() | hex16,
    debug=st.booleans(),
)


@given(contexts)
def test_traceparent_round_trips(ctx: TraceContext) -> None:
    got = tracing.parse_traceparent(tracing.format_traceparent(ctx))
    assert got == TraceContext(ctx.trace_id, ctx.span_id, ctx.sampled)


@given(contexts)
def test_b3_single_round_trips(ctx: TraceContext) -> None:
    got = tracing.parse_b3_single(tracing.format_b3_single(ctx))
    assert got is not None
    assert (got.trace_id, got.span_id, got.parent_id, got.debug) == (
        ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.debug,
    )  # fmt: skip
    assert got.sampled == (ctx.sampled or ctx.debug)


@given(contexts)
def test_b3_multi_round_trips(ctx: TraceContext) -> None:
    got = tracing.parse_b3_multi(tracing.b3_multi_headers(ctx))
    assert got is not None
    assert (got.trace_id, got.span_id, got.parent_id, got.debug) == (
        ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.debug,
    )  # fmt: skip
    assert got.sampled == (ctx.sampled or ctx.debug)


@given(contexts, st.sampled_from(["single", "multi", None]), st.booleans())
def test_inject_then_extract_gives_the_context_back(
    ctx: TraceContext, b3: tracing.B3Style | None, with_state: bool
) -> None:
    if with_state:
        ctx = TraceContext(ctx.trace_id, ctx.span_id, ctx.sampled, tracestate="vendor=abc,x=1")
    stale = [
        (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
        (b"x-b3-traceid", b"3" * 32),
        (b"b3", b"0"),
        (b"user-agent", b"curl"),
    ]
    headers = tracing.inject(stale, ctx, b3)
    names = [k for k, _ in headers]
    assert names.count(b"traceparent") == 1
    assert (b"user-agent", b"curl") in headers
    got = tracing.extract(headers)
    assert got is not None
    assert (got.trace_id, got.span_id, got.sampled) == (ctx.trace_id, ctx.span_id, ctx.sampled)
    assert got.tracestate == ctx.tracestate
    if b3 is not None:
        only_b3 = [(k, v) for k, v in headers if k not in (b"traceparent", b"tracestate")]
        b3ctx = tracing.extract(only_b3)
        assert b3ctx is not None
        assert (b3ctx.trace_id, b3ctx.span_id) == (ctx.trace_id, ctx.span_id)


@given(st.binary(max_size=80))
def test_garbage_headers_never_raise(value: bytes) -> None:
    for name in (b"traceparent", b"b3", b"x-b3-traceid"):
        headers = [(name, value), (b"x-b3-spanid", value), (b"x-b3-sampled", value)]
        ctx = tracing.extract(headers)
        if ctx is not None:
            assert len(ctx.trace_id) == 32
            assert len(ctx.span_id) == 16


@pytest.mark.parametrize(
    "value",
    [
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # zero trace id
        "00-" + "1" * 32 + "-" + "0" * 16 + "-01",  # zero span id
        "ff-" + "1" * 32 + "-" + "2" * 16 + "-01",  # forbidden version
        "00-" + "1" * 32 + "-" + "2" * 16 + "-01-extra",  # v00 has no extra fields
        "00-" + "A" * 32 + "-" + "2" * 16 + "-01",  # upper case
        "00-" + "1" * 31 + "-" + "2" * 16 + "-01",
    ],
)
def test_invalid_traceparent_is_ignored(value: str) -> None:
    assert tracing.parse_traceparent(value) is None


def test_future_traceparent_version_with_extra_fields_is_accepted() -> None:
    ctx = tracing.parse_traceparent("01-" + "1" * 32 + "-" + "2" * 16 + "-01-what-ever")
    assert ctx is not None
    assert ctx.sampled


def test_b3_64_bit_trace_ids_are_padded_and_lone_flag_is_a_decision() -> None:
    ctx = tracing.parse_b3_single("463ac35c9f6413ad-a2fb4a1d1a96d312-1")
    assert ctx is not None
    assert ctx.trace_id == "0000000000000000463ac35c9f6413ad"
    assert tracing.parse_b3_single("0") is None
    assert tracing.sampling_only([(b"b3", b"0")]) is False
    assert tracing.sampling_only([(b"x-b3-sampled", b"1")]) is True
    assert tracing.sampling_only([]) is None


def test_request_id_is_generated_only_when_absent() -> None:
    headers, rid = tracing.ensure_request_id([(b"host", b"a")])
    assert uuid.UUID(rid).version == 4
    assert (b"x-request-id", rid.encode()) in headers
    headers2, rid2 = tracing.ensure_request_id(headers)
    assert rid2 == rid
    assert headers2 == headers
    _, rid3 = tracing.ensure_request_id([(b"x-request-id", b"")])
    assert rid3
    assert rid3 != rid


def test_client_then_server_span_chain_and_caller_decision() -> None:
    src, dst = Tracer("source", sample_rate=0.0), Tracer("destination", sample_rate=0.0)
    app = [(b"traceparent", ("00-" + "a" * 32 + "-" + "b" * 16 + "-01").encode())]
    client = src.start(app, kind="CLIENT", name="my-app.shop:80/*")
    assert client.sampled  # the caller's flag wins over the local rate
    assert client.span.trace_id == "a" * 32
    assert client.span.parent_id == "b" * 16
    server = dst.start(client.downstream_headers(app), kind="SERVER", name="my-app.shop:80/*")
    assert server.span.trace_id == "a" * 32
    assert server.span.parent_id == client.span.span_id
    assert server.span.span_id != client.span.span_id
    to_app = tracing.extract(server.downstream_headers([]))
    assert to_app is not None
    assert to_app.span_id == server.span.span_id


def test_sampling_rate_decides_by_trace_id_so_agents_agree() -> None:
    low = "0" * 16 + "0000000000000001"
    high = "0" * 16 + "ffffffffffffffff"
    t = Tracer("x", sample_rate=0.5)
    assert t.decide(low)
    assert not t.decide(high)
    assert Tracer("x", sample_rate=1.0).decide(high)
    assert not Tracer("x", sample_rate=0.0).decide(low)
    with pytest.raises(ValueError, match="outside"):
        Tracer("x", sample_rate=1.5)
    unsampled = Tracer("x", sample_rate=0.0).start([], kind="SERVER", name="n")
    assert not unsampled.sampled
    assert tracing.extract(unsampled.downstream_headers([])) is not None


def test_new_ids_are_lower_hex_of_the_right_width_distinct_and_never_all_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traces = {tracing.new_trace_id() for _ in range(1000)}
    spans = {tracing.new_span_id() for _ in range(1000)}
    assert len(traces) == 1000
    assert len(spans) == 1000
    hexdigits = set("0123456789abcdef")
    assert all(len(t) == 32 and set(t) <= hexdigits for t in traces)
    assert all(len(s) == 16 and set(s) <= hexdigits for s in spans)
    # An all-zero id is invalid in W3C trace context and B3: even a zero draw must not give one.
    monkeypatch.setattr(tracing.random, "getrandbits", lambda bits: 0)
    assert tracing.new_trace_id() == "0" * 31 + "1"
    assert tracing.new_span_id() == "0" * 15 + "1"
