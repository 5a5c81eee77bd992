"""Data-plane recording: HttpProxy spans and trace headers, request/TCP metrics, access lines,
and the trace context carried through the CONNECT's headers (real parser, real Zipkin export)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import trio
import trio.testing
from snapshot_docs import service, snapshot_of, workload

from nodeagent.balance import Registry as BalanceRegistry
from nodeagent.http import HttpProxy, RequestLog
from nodeagent.httpserver import HttpServerRequest, Response, Route, TcpHttpServer
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot
from nodeagent.snapshot.model import Endpoint
from nodeagent.telemetry.accesslog import AccessLog, AccessRecord
from nodeagent.telemetry.dataplane import (
    TcpRecorder,
    peer_workload,
    record_request,
    service_for,
    service_of,
)
from nodeagent.telemetry.exposition import samples
from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry
from nodeagent.telemetry.tracing import (
    CURRENT_TRACE,
    TraceContext,
    Tracer,
    ZipkinExporter,
    incoming_b3,
    tunnel_headers,
    tunnel_trace,
)
from nodeagent.tunnel.hbone import ConnectRequest, SourceInfo, connect_headers, parse_connect

HOST = "app.default.svc.cluster.local"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


# -- a small mesh snapshot ------------------------------------------------------------------------


def _snapshot(*, with_v1: bool = True) -> Snapshot:
    return snapshot_of(_snapshot_docs(with_v1=with_v1))


def _snapshot_docs(*, with_v1: bool = True) -> list[dict[str, Any]]:
    docs = [
        service("app"),
        workload("2", "10.0.0.2", {"app": "app", "version": "v2"}, name="app-v2-5d4f6b7c9-abcde",
                 sa="app"),
        workload("3", "10.0.0.9", {"app": "client"}, name="client-6c5f8d9b7-qwert", sa="client"),
        workload("4", None, {"app": "gw"}, name="gw", sa="gw"),
    ]  # fmt: skip
    if with_v1:
        docs.insert(1, workload("1", "10.0.0.1", {"app": "app", "version": "v1"},
                                name="app-v1-5d4f6b7c9-x2x7k", sa="app"))  # fmt: skip
    return docs


SNAP = _snapshot()
ONLY_V2 = _snapshot(with_v1=False)  # what the proxy sees: one endpoint to pick


class Sinks:
    """The real metrics, access log and tracer, as `Telemetry` holds them."""

    def __init__(self, tracer: Tracer | None = None) -> None:
        self.registry = MetricsRegistry()
        self.metrics = IstioMetrics(self.registry)
        self.access_log = AccessLog()
        self.tracer = tracer or Tracer("node-1", sample_rate=1.0)

    def records(self) -> list[AccessRecord]:
        out = []
        while True:
            try:
                out.append(self.access_log._receive.receive_nowait())
            except trio.WouldBlock:
                return out

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(s.labels, s.value) for s in samples(self.registry.render(), name)]


# -- a real Zipkin collector and HTTP backend ------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.server = TcpHttpServer(
            "127.0.0.1", 0, {"/api/v2/spans": Route(self._post, frozenset({"POST"}))}
        )

    def _post(self, req: HttpServerRequest) -> Response:
        self.spans.extend(json.loads(req.body))
        return Response(202, b"")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/api/v2/spans"


async def _backend(seen: list[dict[str, str]], stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                seen.append({k.decode(): v.decode() for k, v in event.headers})
            elif isinstance(event, h11.EndOfMessage):
                body = b"hello"
                out = conn.send(
                    h11.Response(status_code=200, headers=[("content-length", str(len(body)))])
                )
                await stream.send_all(
                    (out or b"") + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )  # fmt: skip
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


@asynccontextmanager
async def _proxy(
    sinks: Sinks, tunnel_contexts: list[TraceContext | None]
) -> AsyncIterator[tuple[h11.Connection, trio.abc.Stream, list[dict[str, str]]]]:
    """An HttpProxy with a tracer in front of one backend (v2 at 10.0.0.2); the connector
    records the CURRENT_TRACE it sees, as the mesh connector puts it in the tunnel header."""
    seen: list[dict[str, str]] = []
    async with trio.open_nursery() as nursery:

        async def connect(endpoint: Endpoint, port: int) -> trio.abc.Stream:
            tunnel_contexts.append(CURRENT_TRACE.get())
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(_backend, seen, b)
            return a

        def on_request(entry: RequestLog) -> None:
            record_request(sinks, SNAP, entry, source=SNAP.workload_by_ip("10.0.0.9"),
                           namespace="default")  # fmt: skip

        proxy = HttpProxy(
            snapshot=lambda: ONLY_V2,
            source=Source(namespace="default", labels={"app": "client"}),
            connector=connect,
            registry=BalanceRegistry(),
            on_request=on_request,
            tracer=sinks.tracer,
        )
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(partial(proxy.serve, server, port=80, host=HOST))
        yield h11.Connection(h11.CLIENT), client, seen
        await client.aclose()
        nursery.cancel_scope.cancel()


async def _get(
    conn: h11.Connection, stream: trio.abc.Stream, headers: list[tuple[str, str]]
) -> int:
    data = conn.send(h11.Request(method="GET", target="/x", headers=[("host", "app"), *headers]))
    await stream.send_all((data or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status


async def _with_collector(
    body: Callable[[Collector, ZipkinExporter], Awaitable[None]],
) -> list[dict[str, Any]]:
    collector = Collector()
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.server.run)
        exporter = ZipkinExporter(collector.url, interval=0.01)
        await body(collector, exporter)
        await exporter.flush()
        nursery.cancel_scope.cancel()
    return collector.spans


# -- tests ---------------------------------------------------------------------------------------


async def test_http_request_continues_w3c_trace_and_records_metrics_and_log() -> None:
    contexts: list[TraceContext | None] = []
    sinks: Sinks | None = None

    async def run(_: Collector, exporter: ZipkinExporter) -> None:
        nonlocal sinks
        sinks = Sinks(Tracer("node-1", sample_rate=0.0, exporter=exporter))
        async with _proxy(sinks, contexts) as (conn, stream, seen):
            tp = f"00-{TRACE}-{PARENT}-01"
            assert await _get(conn, stream, [("traceparent", tp), ("x-request-id", "rid-1")]) == 200
            assert await _get(conn, stream, []) == 200  # no context: new trace, rate 0: unsampled
        up = seen[0]
        assert up["traceparent"].startswith(f"00-{TRACE}-")
        assert up["traceparent"].endswith("-01")
        client_span_id = up["traceparent"].split("-")[2]
        assert client_span_id != PARENT
        assert not any(k.startswith("x-b3") or k == "b3" for k in up)  # the caller used no B3
        assert up["x-request-id"] == "rid-1"
        assert seen[1]["traceparent"].endswith("-00")
        assert TRACE not in seen[1]["traceparent"]
        # The pooled connection was opened by the first request: its context goes in the tunnel.
        assert len(contexts) == 1
        assert contexts[0] is not None
        assert (contexts[0].trace_id, contexts[0].span_id) == (TRACE, client_span_id)

    spans = await _with_collector(run)
    assert sinks is not None
    assert len(spans) == 1  # the unsampled second request exported nothing
    span = spans[0]
    assert (span["traceId"], span["parentId"], span["kind"]) == (TRACE, PARENT, "CLIENT")
    assert span["tags"]["http.status_code"] == "200"
    assert span["tags"]["upstream_host"] == "10.0.0.2:8080"

    requests = sinks.series("istio_requests_total")
    assert len(requests) == 1
    labels, value = requests[0]
    assert value == 2
    assert labels["reporter"] == "source"
    assert labels["source_workload"] == "client"
    assert labels["source_app"] == "client"
    assert labels["destination_workload"] == "app-v2"
    assert labels["destination_version"] == "v2"
    assert labels["destination_service"] == HOST
    assert labels["destination_service_name"] == "app"
    assert labels["destination_principal"].endswith("/ns/default/sa/app")
    assert (labels["response_code"], labels["response_flags"]) == ("200", "-")
    assert labels["request_protocol"] == "http"
    assert labels["connection_security_policy"] == "mutual_tls"
    counts = sinks.series("istio_response_bytes_count")
    assert counts[0][1] == 2
    records = sinks.records()
    assert [r.kind for r in records] == ["request", "request"]
    first = records[0]
    assert (first.method, first.path, first.authority) == ("GET", "/x", "app")
    assert (first.response_code, first.request_id, first.trace_id) == (200, "rid-1", TRACE)
    assert first.upstream_host == "10.0.0.2:8080"
    assert first.bytes_sent > 0
    assert first.destination_principal.endswith("/sa/app")
    assert records[1].request_id not in ("-", "rid-1")
    assert len(records[1].request_id) == 36


async def test_b3_callers_get_b3_back_in_their_style() -> None:
    contexts: list[TraceContext | None] = []
    sinks = Sinks()
    async with _proxy(sinks, contexts) as (conn, stream, seen):
        await _get(conn, stream, [("b3", f"{TRACE}-{PARENT}-1")])
        await _get(conn, stream, [("x-b3-traceid", TRACE[16:]), ("x-b3-spanid", PARENT),
                                  ("x-b3-sampled", "1")])  # fmt: skip
    single, multi = seen
    span_id = single["traceparent"].split("-")[2]
    assert single["b3"] == f"{TRACE}-{span_id}-1-{PARENT}"
    assert "x-b3-traceid" not in single
    assert multi["x-b3-traceid"] == TRACE[16:].rjust(32, "0")
    assert multi["x-b3-parentspanid"] == PARENT
    assert multi["x-b3-sampled"] == "1"
    assert multi["x-b3-spanid"] != PARENT
    assert "b3" not in multi
    assert incoming_b3([(b"x-b3-sampled", b"0")]) == "multi"
    assert incoming_b3([(b"traceparent", b"x")]) is None


async def test_tunnel_header_carries_the_client_span_to_a_server_span() -> None:
    sinks_src: Sinks | None = None
    sinks_dst: Sinks | None = None

    async def run(_: Collector, exporter: ZipkinExporter) -> None:
        nonlocal sinks_src, sinks_dst
        sinks_src = Sinks(Tracer("n1", sample_rate=1.0, exporter=exporter))
        sinks_dst = Sinks(Tracer("n2", sample_rate=0.0, exporter=exporter))  # follows the flag
        client = sinks_src.tracer.start([], kind="CLIENT", name="app:80/*")
        block = connect_headers(
            ConnectRequest("10.0.0.2", 8080, source=SourceInfo("default", "gw"),
                           trace=tuple(tunnel_trace(client.context).items()))
        )  # fmt: skip
        request = parse_connect((n.encode(), v.encode()) for n, v in block)
        headers = tunnel_headers(request.trace_map())
        assert headers is not None
        server = sinks_dst.tracer.start(headers, kind="SERVER", name="inbound|8080")
        me = SNAP.workload_by_ip("10.0.0.2")
        assert me is not None
        tel = TcpRecorder(
            sinks_dst,
            reporter="destination",
            namespace="default",
            source=peer_workload(SNAP, "192.168.1.1", identity="spiffe://cluster.local/ns/default/sa/gw",
                                 name="gw", namespace="default"),
            destination=me,
            service=service_for(SNAP, me, 8080),
            security_policy="mutual_tls",
            source_principal="spiffe://cluster.local/ns/default/sa/gw",
            downstream="192.168.1.1:40000",
            upstream="10.0.0.2:8080",
            span=server,
        )  # fmt: skip
        tel.opened()
        tel.closed(to_upstream=100, to_client=2000)
        client.finish(status_code=200)

    spans = await _with_collector(run)
    by_kind = {s["kind"]: s for s in spans}
    assert set(by_kind) == {"CLIENT", "SERVER"}
    assert by_kind["SERVER"]["parentId"] == by_kind["CLIENT"]["id"]
    assert by_kind["SERVER"]["traceId"] == by_kind["CLIENT"]["traceId"]
    assert by_kind["SERVER"]["localEndpoint"]["serviceName"] == "n2"
    assert sinks_dst is not None
    (labels, opened), = sinks_dst.series("istio_tcp_connections_opened_total")  # fmt: skip
    assert opened == 1
    assert labels["reporter"] == "destination"
    assert labels["source_workload"] == "gw"  # found by the header's name and verified identity
    assert labels["destination_version"] == "v2"
    assert labels["destination_service_name"] == "app"
    assert labels["connection_security_policy"] == "mutual_tls"
    assert labels["request_protocol"] == "tcp"
    # Istio's direction: sent = to the client (response), received = from it (request).
    assert sinks_dst.series("istio_tcp_sent_bytes_total")[0][1] == 2000
    assert sinks_dst.series("istio_tcp_received_bytes_total")[0][1] == 100
    (record,) = sinks_dst.records()
    assert record.kind == "connection"
    assert record.reporter == "destination"
    assert (record.bytes_received, record.bytes_sent) == (100, 2000)
    assert record.trace_id == by_kind["SERVER"]["traceId"]
    assert record.source_principal.endswith("/sa/gw")


def test_denied_connection_pairs_opened_and_closed_with_a_flag() -> None:
    sinks = Sinks()
    me = SNAP.workload_by_ip("10.0.0.1")
    tel = TcpRecorder(
        sinks, reporter="destination", namespace="shop", source=None, destination=me,
        service=None, security_policy="none",
    )  # fmt: skip
    tel.closed(to_upstream=0, to_client=0, result="denied")
    tel.closed(to_upstream=5, to_client=5, result="ok")  # a second close changes nothing
    (labels, n), = sinks.series("istio_tcp_connections_opened_total")  # fmt: skip
    (closed_labels, m), = sinks.series("istio_tcp_connections_closed_total")  # fmt: skip
    assert (n, m) == (1, 1)
    assert labels["response_flags"] == "-"
    assert closed_labels["response_flags"] == "UAEX"
    assert closed_labels["source_workload"] == "unknown"
    assert sinks.series("istio_tcp_sent_bytes_total") == []
    (record,) = sinks.records()
    assert (record.response_flags, record.namespace) == ("UAEX", "shop")
    overflow = TcpRecorder(
        sinks, reporter="source", namespace="shop", source=me, destination=None, service=None,
        security_policy="none",
    )  # fmt: skip
    overflow.closed(to_upstream=0, to_client=0, result="denied", flag="UO")
    flags = {s[0]["response_flags"] for s in sinks.series("istio_tcp_connections_closed_total")}
    assert flags == {"UAEX", "UO"}


def test_service_and_peer_lookups() -> None:
    me = SNAP.workload_by_ip("10.0.0.1")
    assert me is not None
    svc = service_for(SNAP, me, 8080)
    assert svc is not None
    assert svc.hostname == HOST
    assert service_for(SNAP, me, 9999) is None
    assert service_of(SNAP, "default/app") is svc
    assert service_of(SNAP, None) is None
    assert service_of(SNAP, "nonsense") is None
    client = SNAP.workload_by_ip("10.0.0.9")
    assert peer_workload(SNAP, "10.0.0.9") is client
    assert peer_workload(SNAP, "10.9.9.9", identity="spiffe://x", name="gw") is None


def test_tunnel_trace_round_trip_and_rejects() -> None:
    ctx = TraceContext(TRACE, PARENT, sampled=True, tracestate="a=b")
    trace = tunnel_trace(ctx)
    assert trace == {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "a=b"}
    assert tunnel_headers(trace) == [
        (b"traceparent", trace["traceparent"].encode()),
        (b"tracestate", b"a=b"),
    ]
    assert tunnel_trace(None) == {}
    assert tunnel_headers({"conn": "p#1"}) is None
    assert tunnel_headers({"traceparent": "00-zz-11-01"}) is None


async def test_fault_abort_names_the_destination_and_logs_the_client_address() -> None:
    """Istio labels a fault-aborted request with the routed service (not "unknown"), and an
    HTTP access record carries the client's ip:port (over a real TCP connection)."""
    abort = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "app", "namespace": "default"},
        "spec": {
            "hosts": ["app"],
            "http": [
                {
                    "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                    "route": [{"destination": {"host": "app"}}],
                }
            ],
        },
    }
    snap = snapshot_of([*_snapshot_docs(), abort])
    sinks = Sinks()

    async def never(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        raise AssertionError("an aborted request opens no upstream connection")

    def on_request(entry: RequestLog) -> None:
        record_request(sinks, snap, entry, source=snap.workload_by_ip("10.0.0.9"),
                       namespace="default")  # fmt: skip

    proxy = HttpProxy(
        snapshot=lambda: snap,
        source=Source(namespace="default", labels={"app": "client"}),
        connector=never,
        registry=BalanceRegistry(),
        on_request=on_request,
    )
    async with trio.open_nursery() as nursery:

        async def handle(stream: trio.SocketStream) -> None:
            await proxy.serve(stream, port=80, host=HOST, client_address="127.0.0.1")

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client_port = stream.socket.getsockname()[1]
        assert await _get(h11.Connection(h11.CLIENT), stream, []) == 418
        await stream.aclose()
        nursery.cancel_scope.cancel()
    (labels, value), *_ = sinks.series("istio_requests_total")
    assert (labels["response_code"], labels["response_flags"], value) == ("418", "FI", 1)
    assert labels["destination_service"] == HOST
    assert labels["destination_service_name"] == "app"
    (record,) = sinks.records()
    assert record.downstream_address == f"127.0.0.1:{client_port}"
    assert record.response_flags == "FI"
