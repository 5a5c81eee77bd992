"""Access log lines: fields, formats, the per-namespace switch, and never blocking the caller."""

from __future__ import annotations

import io
import json
import threading

import pytest
import trio
import trio.testing

from nodeagent.telemetry.accesslog import AccessLog, AccessRecord
from nodeagent.telemetry.metrics import MetricsRegistry

FIELDS = {
    "start_time", "duration_ms", "method", "authority", "path", "protocol", "response_code",
    "response_flags", "bytes_received", "bytes_sent", "upstream_host", "source_principal",
    "destination_principal", "request_id", "trace_id",
}  # fmt: skip


def _request(ns: str = "shop", **kw: object) -> AccessRecord:
    fields: dict[str, object] = {
        "kind": "request",
        "namespace": ns,
        "start_time": 1_700_000_000.25,
        "duration_ms": 12.3456,
        "protocol": "HTTP/1.1",
        "method": "GET",
        "authority": "my-app.shop:80",
        "path": "/hello",
        "response_code": 200,
        "bytes_received": 12,
        "bytes_sent": 345,
        "upstream_host": "10.0.2.7:15008",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/client",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/my-app",
        "request_id": "6f1c9c9e-0000-4000-8000-000000000000",
        "trace_id": "a" * 32,
    }
    fields.update(kw)
    return AccessRecord(**fields)  # type: ignore[arg-type]


async def _drain(log: AccessLog, lines: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        with trio.fail_after(5):
            while log.written < lines:
                await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_json_line_per_request_and_connection_with_all_fields() -> None:
    sink = io.StringIO()
    log = AccessLog(sink=sink)
    log.log(_request())
    log.log(AccessRecord(kind="connection", namespace="shop", start_time=0.0, duration_ms=5,
                         bytes_received=1, bytes_sent=2, response_flags="UF"))  # fmt: skip
    await _drain(log, 2)
    first, second = (json.loads(line) for line in sink.getvalue().splitlines())
    assert set(first) >= FIELDS
    assert first["event"] == "access.request"
    assert first["start_time"] == "2023-11-14T22:13:20.250+00:00"
    assert first["duration_ms"] == 12.346
    assert first["response_code"] == 200
    assert first["bytes_received"] == 12
    assert first["trace_id"] == "a" * 32
    assert second["event"] == "access.connection"
    assert second["response_flags"] == "UF"
    assert second["method"] == "-"


async def test_console_format_is_readable() -> None:
    sink = io.StringIO()
    log = AccessLog(sink=sink, fmt="console")
    log.log(_request())
    await _drain(log, 1)
    line = sink.getvalue()
    assert "access.request" in line
    assert "path=/hello" in line
    assert "response_code=200" in line
    assert not line.lstrip().startswith("{")
    with pytest.raises(ValueError, match="format 'xml'"):
        AccessLog(fmt="xml")  # type: ignore[arg-type]


async def test_switchable_per_namespace() -> None:
    sink = io.StringIO()
    log = AccessLog(sink=sink, enabled=False, namespaces={"shop": True})
    log.log(_request("shop", path="/a"))
    log.log(_request("other", path="/b"))
    log.set_namespace("other", True)
    log.set_namespace("shop", False)
    log.log(_request("shop", path="/c"))
    log.log(_request("other", path="/d"))
    log.set_namespace("other", None)
    log.log(_request("other", path="/e"))
    await _drain(log, 2)
    assert [json.loads(x)["path"] for x in sink.getvalue().splitlines()] == ["/a", "/d"]


class _StuckSink:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.text: list[str] = []

    def write(self, text: str, /) -> int:
        self.release.wait(10)
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass


async def test_a_stuck_sink_never_blocks_logging_and_drops_are_counted() -> None:
    sink = _StuckSink()
    log = AccessLog(sink=sink, max_queue=4)
    reg = MetricsRegistry()
    reg.add_collector(log.collector)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.log(_request(path="/0"))
        await trio.testing.wait_all_tasks_blocked()  # the writer holds /0, stuck in the sink
        for i in range(1, 11):
            log.log(_request(path=f"/{i}"))  # returns at once although stderr is "full"
        assert log.statistics()["dropped"] == 6
        assert "nodeagent_accesslog_dropped_total 6\n" in reg.render()
        sink.release.set()
        with trio.fail_after(5):
            while log.written < 5:
                await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    paths = [json.loads(x)["path"] for x in "".join(sink.text).splitlines()]
    assert paths == ["/0", "/1", "/2", "/3", "/4"]


def test_json_line_is_what_structlogs_renderer_writes() -> None:
    # The fast path builds the JSON itself; it must stay byte-identical to structlog's
    # JSONRenderer (field order included), which the console format still uses.
    import structlog

    log = AccessLog(sink=io.StringIO())
    record = _request(path='/a"\\é', authority="-")
    line = log.render(record)
    event = json.loads(line)
    expected = structlog.processors.JSONRenderer(sort_keys=False)(None, "info", dict(event))
    assert line == expected + "\n"
    assert list(event)[:3] == ["kind", "namespace", "start_time"]
    assert list(event)[-3:] == ["event", "component", "timestamp"]


class _CountingSink(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str, /) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_logged_while_a_batch_fills_go_out_in_one_write() -> None:
    sink = _CountingSink()
    log = AccessLog(sink=sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.log(_request(path="/0"))
        await trio.testing.wait_all_tasks_blocked()  # the writer has taken /0 and waits
        for i in range(1, 50):
            log.log(_request(path=f"/{i}"))
        with trio.fail_after(5):
            while log.written < 50:
                await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    paths = [json.loads(x)["path"] for x in sink.getvalue().splitlines()]
    assert paths == [f"/{i}" for i in range(50)]
    assert sink.writes == 1  # one thread hand-off for the whole batch, not one per line
