"""A real Prometheus (Debian `prometheus`) scrapes our endpoint; a query by version matches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_helpers import prometheus_scraping, to_my_app

from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry
from nodeagent.telemetry.server import metrics_server

pytestmark = pytest.mark.slow
DEADLINE = 40.0


async def _get_json(url: str, *args: str) -> Any:
    proc = await trio.run_process(
        ["curl", "-sf", "--max-time", "3", *args, url], capture_stdout=True, check=False
    )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


async def test_prometheus_scrapes_and_sums_by_destination_version(tmp_path: Path) -> None:
    reg = MetricsRegistry()
    metrics = IstioMetrics(reg)
    sent = {"v1": 90, "v2": 10}
    for version, n in sent.items():
        peer = to_my_app("destination", version)
        for i in range(n):
            code = 500 if i == 0 else 200  # two series per version: the query must sum them
            metrics.record_request(
                peer, response_code=code, duration_ms=i, request_bytes=i, response_bytes=i
            )
    server = metrics_server(reg, lambda: True, host="127.0.0.1", port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with prometheus_scraping(tmp_path, f"127.0.0.1:{server.port}") as prom:
            api = f"{prom.url}/api/v1"
            result: dict[str, float] = {}
            target: dict[str, Any] = {}
            with trio.move_on_after(DEADLINE):
                while result != sent:
                    await trio.sleep(0.5)  # polling a real server, not a unit test
                    assert prom.process.returncode is None, prom.log()
                    answer = await _get_json(
                        f"{api}/query",
                        "--data-urlencode",
                        "query=sum by (destination_version) (istio_requests_total)",
                    )
                    if answer and answer.get("status") == "success":
                        result = {
                            r["metric"].get("destination_version", "?"): float(r["value"][1])
                            for r in answer["data"]["result"]
                        }
            targets = await _get_json(f"{api}/targets")
            if targets:
                target = targets["data"]["activeTargets"][0]
        nursery.cancel_scope.cancel()
    log = (tmp_path / "prometheus.log").read_text()
    assert result == sent, f"query gave {result}; prometheus log:\n{log[-3000:]}"
    assert target.get("health") == "up"
    assert target.get("lastError") == ""
