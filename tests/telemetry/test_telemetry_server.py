"""The 15020-style TCP endpoint, spoken to by curl on loopback."""

from __future__ import annotations

import pytest
import trio

from nodeagent.telemetry import exposition
from nodeagent.telemetry.metrics import CONTENT_TYPE, IstioMetrics, MetricsRegistry, peer_labels
from nodeagent.telemetry.server import metrics_server


async def curl(url: str, *extra: str) -> tuple[int, str, str]:
    proc = await trio.run_process(
        ["curl", "-s", "-D", "-", "-w", "\n%{http_code}", "--max-time", "5", *extra, url],
        capture_stdout=True,
        check=False,
    )
    text, _, code = proc.stdout.decode().rpartition("\n")
    head, _, body = text.partition("\r\n\r\n")
    return int(code), head, body


async def test_serves_prometheus_text_and_readiness_on_tcp() -> None:
    reg = MetricsRegistry()
    metrics = IstioMetrics(reg)
    peer = peer_labels(
        reporter="source", source=None, destination=None, service=None, protocol="http"
    )
    metrics.record_request(
        peer, response_code=503, duration_ms=1, request_bytes=1, response_bytes=2
    )
    ready = False
    server = metrics_server(reg, lambda: ready, host="127.0.0.1", port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        base = f"http://127.0.0.1:{server.port}"
        code, head, body = await curl(f"{base}/stats/prometheus")
        assert code == 200
        assert f"content-type: {CONTENT_TYPE}" in head.lower()
        (sample,) = exposition.samples(body, "istio_requests_total")
        assert sample.labels["response_code"] == "503"
        code, _, body = await curl(f"{base}/healthz/ready")
        assert (code, body) == (503, "starting\n")
        ready = True
        code, _, body = await curl(f"{base}/healthz/ready")
        assert (code, body) == (200, "ready\n")
        code, head, _ = await curl(f"{base}/stats/prometheus", "-X", "DELETE")
        assert code == 405
        assert "allow: get, head" in head.lower()
        code, _, body = await curl(f"{base}/stats/prometheus", "-I")
        assert code == 200
        nursery.cancel_scope.cancel()


async def test_port_in_use_is_a_clear_error_before_started() -> None:
    reg = MetricsRegistry()
    first = metrics_server(reg, lambda: True, host="127.0.0.1", port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        second = metrics_server(reg, lambda: True, host="127.0.0.1", port=first.port)
        with pytest.raises(
            OSError, match=rf"bind telemetry on 127.0.0.1:{first.port}: address in use"
        ):
            await nursery.start(second.run)
        nursery.cancel_scope.cancel()
