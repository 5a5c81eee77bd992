"""The controller's two metric sources read the same figures from a real metrics endpoint:
`AgentScraper` (the agent's /stats/prometheus, found through its announcement in the store) and
`PrometheusSource` (a real Prometheus, Debian `prometheus`, scraping that endpoint). Webhooks
are called against a real loopback HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio
from prometheus_helpers import free_port, prometheus_scraping, to_my_app
from rollout_docs import CANARY, body, rollout_yaml

from nodeagent.rollout.controller import call_webhooks
from nodeagent.rollout.metrics import Counters, select, window
from nodeagent.rollout.model import compile_rollout
from nodeagent.rollout.sources import (
    AgentScraper,
    PrometheusSource,
    Reading,
    SourceError,
    prometheus_samples,
)
from nodeagent.snapshot.model import Service, ServicePort
from nodeagent.store import keys, open_store
from nodeagent.store.codec import encode
from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry
from nodeagent.telemetry.server import metrics_server

HOST = "my-app.shop.svc.cluster.local"
DEADLINE = 40.0


SERVICE = Service(
    "Service", "shop", "my-app", (HOST,), ("10.96.0.9",), (ServicePort("http", 80, 8080),), {}
)


def _record(metrics: IstioMetrics, version: str, n: int, failures: int, ms: float) -> None:
    peer = to_my_app("source", version, SERVICE)
    for i in range(n):
        metrics.record_request(
            peer,
            response_code=503 if i < failures else 200,
            duration_ms=ms,
            request_bytes=1,
            response_bytes=1,
        )


def _counters(reading: Reading) -> Counters:
    out: Counters = {}
    for instance, samples in reading:
        out.update(select(instance, samples, HOST))
    return out


@pytest.mark.slow
async def test_agent_scraper_and_prometheus_see_the_same_window(tmp_path: Path) -> None:
    reg = MetricsRegistry()
    metrics = IstioMetrics(reg)
    _record(metrics, "v1", 1, 0, 3)  # both series exist before the first reading
    _record(metrics, "v2", 1, 0, 3)
    server = metrics_server(reg, lambda: True, host="127.0.0.1", port=0)
    store = await open_store("memory://")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await store.put(
            keys.node("n1"), encode({"version": 1, "metrics": f"127.0.0.1:{server.port}"})
        )
        scraper = AgentScraper(store)
        async with prometheus_scraping(tmp_path, f"127.0.0.1:{server.port}") as prom:
            prometheus = PrometheusSource(prom.url)
            before_agent = _counters(await scraper.read())
            _record(metrics, "v1", 90, 0, 3)
            _record(metrics, "v2", 10, 1, 300)
            after_agent = _counters(await scraper.read())
            by_agent = window(before_agent, after_agent)
            assert by_agent["v1"].requests == 90
            assert by_agent["v2"].requests == 10
            assert by_agent["v2"].success_rate == pytest.approx(90.0)
            p99 = by_agent["v2"].quantile(0.99)
            assert p99 is not None
            assert 250 < p99 <= 500
            # Prometheus: wait until its latest scrape has everything, then compare totals.
            totals: dict[str, float] = {}
            with trio.move_on_after(DEADLINE):
                while totals.get("v2") != 11:
                    await trio.sleep(0.5)  # polling a real server, not a unit test
                    assert prom.process.returncode is None, prom.log()
                    try:
                        reading = await prometheus.read()
                    except SourceError:
                        continue
                    counters = _counters(reading)
                    totals = {}
                    for (_, metric, version, _, _), n in counters.items():
                        if metric == "istio_requests_total":
                            totals[version] = totals.get(version, 0) + n
            assert totals == {"v1": 91, "v2": 11}, prom.log()[-2000:]
            from_prom = _counters(reading)
            assert {k[1:]: v for k, v in from_prom.items() if k[1]} == {
                k[1:]: v for k, v in after_agent.items() if k[1]
            }
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_an_unreachable_agent_fails_the_whole_reading() -> None:
    store = await open_store("memory://")
    try:
        with pytest.raises(SourceError, match="no agent has announced"):
            await AgentScraper(store).read()
        await store.put(
            keys.node("n2"), encode({"version": 1, "metrics": f"127.0.0.1:{free_port()}"})
        )
        with pytest.raises(SourceError, match=r"agent n2: GET http://127\.0\.0\.1:"):
            await AgentScraper(store, timeout=2).read()
    finally:
        await store.aclose()


def test_prometheus_answers_are_checked() -> None:
    ok = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {
                    "metric": {"__name__": "istio_requests_total", "instance": "a:1", "job": "j",
                               "reporter": "source"},
                    "value": [1, "7"],
                }
            ],
        },
    }  # fmt: skip
    ((instance, (sample,)),) = prometheus_samples(json.dumps(ok).encode())
    assert instance == "a:1/j"
    assert (sample.name, sample.value, sample.labels) == (
        "istio_requests_total",
        7.0,
        {"reporter": "source"},
    )
    with pytest.raises(SourceError, match="query failed: bad query"):
        prometheus_samples(b'{"status": "error", "error": "bad query"}')
    with pytest.raises(SourceError, match="unexpected query answer"):
        prometheus_samples(b"<html>")


class _Hooks(BaseHTTPRequestHandler):
    seen: list[dict[str, object]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _Hooks.seen.append(payload)
        self.send_response(200 if self.path == "/ok" else 503)
        self.send_header("content-length", "0")
        self.end_headers()


@pytest.fixture
def hook_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_webhooks_are_gates_that_must_answer_2xx(hook_server: int) -> None:
    base = f"http://127.0.0.1:{hook_server}"
    hooks = f"""    webhooks:
    - {{name: smoke, type: rollout, url: "{base}/ok", metadata: {{cmd: run}}}}
    - {{name: gate, type: rollout, url: "{base}/no", timeout: 2s}}
    - {{name: before, type: pre-rollout, url: "{base}/ok"}}
"""
    r = compile_rollout(body(rollout_yaml(CANARY + hooks)))
    assert await call_webhooks(r.webhooks_of("pre-rollout"), r, "Initializing") == ""
    problem = await call_webhooks(r.webhooks_of("rollout"), r, "Progressing")
    assert problem == "webhook gate: HTTP 503"
    assert _Hooks.seen[-2] == {
        "name": "my-app",
        "namespace": "default",
        "phase": "Progressing",
        "metadata": {"cmd": "run"},
    }
    unreachable = compile_rollout(
        body(rollout_yaml(CANARY + f"""    webhooks:
    - {{name: down, url: "http://127.0.0.1:{free_port()}/x", timeout: 1s}}
""")))  # fmt: skip
    assert (await call_webhooks(unreachable.webhooks, unreachable, "Progressing")).startswith(
        "webhook down: POST http://127.0.0.1:"
    )
