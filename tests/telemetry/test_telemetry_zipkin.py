"""Zipkin v2 export to a minimal in-test collector (a trio HTTP server) across two agents."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from nodeagent.httpserver import HttpServerRequest, Response, Route, TcpHttpServer
from nodeagent.telemetry.tracing import SpanEndpoint, Tracer, ZipkinExporter


class Collector:
    """Accepts POST /api/v2/spans like Zipkin (202), or answers `status` to test failures."""

    def __init__(self, status: int = 202) -> None:
        self.status = status
        self.batches: list[list[dict[str, Any]]] = []
        self.server = TcpHttpServer(
            "127.0.0.1", 0, {"/api/v2/spans": Route(self._spans, frozenset({"POST"}))}
        )

    def _spans(self, req: HttpServerRequest) -> Response:
        assert req.method == "POST"
        self.batches.append(json.loads(req.body))
        return Response(self.status, b"")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/api/v2/spans"

    @property
    def spans(self) -> list[dict[str, Any]]:
        return [s for b in self.batches for s in b]


async def test_spans_of_two_agents_link_parent_and_child() -> None:
    collector = Collector()
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.server.run)
        node1 = ZipkinExporter(collector.url)
        node2 = ZipkinExporter(collector.url)
        src = Tracer("node-1", sample_rate=1.0, exporter=node1)
        dst = Tracer("node-2", sample_rate=1.0, exporter=node2)
        # The app sends no trace headers: the source agent starts the trace.
        client = src.start(
            [(b"host", b"my-app")],
            kind="CLIENT",
            name="my-app.shop.svc.cluster.local:80/*",
            remote=SpanEndpoint("my-app.shop", "10.0.2.7", 15008),
        )
        wire = client.downstream_headers([(b"host", b"my-app")])
        server = dst.start(wire, kind="SERVER", name="my-app.shop.svc.cluster.local:80/*")
        server.finish(status_code=200, tags={"upstream_cluster": "v2"})
        client.finish(status_code=200)
        await node2.flush()
        await node1.flush()
        nursery.cancel_scope.cancel()
    spans = {s["kind"]: s for s in collector.spans}
    assert set(spans) == {"CLIENT", "SERVER"}
    c, s = spans["CLIENT"], spans["SERVER"]
    assert c["traceId"] == s["traceId"]
    assert len(c["traceId"]) == 32
    assert "parentId" not in c
    assert s["parentId"] == c["id"]
    assert s["id"] != c["id"]
    assert c["localEndpoint"] == {"serviceName": "node-1"}
    assert c["remoteEndpoint"] == {"serviceName": "my-app.shop", "ipv4": "10.0.2.7", "port": 15008}
    assert s["tags"] == {"http.status_code": "200", "upstream_cluster": "v2"}
    assert c["duration"] >= 1
    assert isinstance(c["timestamp"], int)
    assert node1.statistics()["exported"] == 1
    assert node2.statistics()["failed_batches"] == 0


async def test_run_batches_and_counts_failures_and_drops() -> None:
    collector = Collector(status=500)
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.server.run)
        exporter = ZipkinExporter(collector.url, interval=0.0, max_queue=3)
        tracer = Tracer("node-1", exporter=exporter)
        for _ in range(5):
            tracer.start([], kind="SERVER", name="x").finish(status_code=503)
        assert exporter.dropped == 2  # queue of 3, nothing draining yet: never blocks
        await nursery.start(exporter.run)
        with trio.fail_after(5):
            await exporter.wait_posted(1)
        assert exporter.failed_spans == 3
        assert exporter.exported == 0
        assert sum(len(b) for b in collector.batches) == 3
        assert all(s["tags"]["error"] == "503" for s in collector.spans)
        nursery.cancel_scope.cancel()


async def test_unreachable_collector_is_counted_not_raised() -> None:
    collector = Collector()
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.server.run)
        url = collector.url
        nursery.cancel_scope.cancel()
    exporter = ZipkinExporter(url, timeout=2)  # the port is closed now
    Tracer("n", exporter=exporter).start([], kind="CLIENT", name="x").finish()
    await exporter.flush()
    assert exporter.statistics()["failed_batches"] == 1
    assert exporter.exported == 0


def test_unsampled_spans_are_not_exported() -> None:
    exporter = ZipkinExporter("http://127.0.0.1:9/api/v2/spans")
    Tracer("n", sample_rate=0.0, exporter=exporter).start([], kind="CLIENT", name="x").finish()
    assert exporter.statistics()["queued"] == 0


async def _raw_collector(
    nursery: trio.Nursery, answer: bytes | None, seen: list[bytes]
) -> tuple[str, list[trio.SocketListener]]:
    """A TCP server that records what it received and answers `answer` (None: never answers)."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            seen.append(await stream.receive_some(65536))
            if answer is None:
                await trio.sleep_forever()
            await stream.send_all(answer)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v2/spans", listeners


async def test_request_is_a_json_post_with_host_and_close() -> None:
    seen: list[bytes] = []
    ok = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    async with trio.open_nursery() as nursery:
        url, _ = await _raw_collector(nursery, ok, seen)
        exporter = ZipkinExporter(url)
        Tracer("n", exporter=exporter).start([], kind="CLIENT", name="x").finish()
        await exporter.flush()
        nursery.cancel_scope.cancel()
    assert exporter.exported == 1
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"post /api/v2/spans http/1.1"
    port = url.split(":")[2].split("/")[0]
    assert f"host: 127.0.0.1:{port}".encode() in lines
    assert b"content-type: application/json" in lines
    assert b"connection: close" in lines
    assert [s["name"] for s in json.loads(body)] == ["x"]


async def test_not_http_and_error_bodies_are_counted_with_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        garbage_url, _ = await _raw_collector(nursery, b"SSH-2.0-OpenSSH\r\n\r\n", seen)
        error = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad span id"
        error_url, _ = await _raw_collector(nursery, error, seen)
        for url in (garbage_url, error_url):
            exporter = ZipkinExporter(url)
            Tracer("n", exporter=exporter).start([], kind="CLIENT", name="x").finish()
            await exporter.flush()
            assert exporter.statistics()["failed_batches"] == 1
            assert exporter.exported == 0
        nursery.cancel_scope.cancel()
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "ProtocolError" in out
    assert "HTTP 400: bad span id" in out


async def test_silent_collector_times_out_and_is_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        url, _ = await _raw_collector(nursery, None, seen)
        exporter = ZipkinExporter(url, timeout=5)
        Tracer("n", exporter=exporter).start([], kind="CLIENT", name="x").finish()
        await exporter.flush()
        nursery.cancel_scope.cancel()
    assert exporter.statistics()["failed_batches"] == 1
    assert exporter.failed_spans == 1
