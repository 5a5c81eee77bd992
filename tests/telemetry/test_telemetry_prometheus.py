"""A real Prometheus (Debian `prometheus`) scrapes our endpoint; a query by version matches."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import trio

from nodeagent.snapshot.model import Workload
from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry, peer_labels
from nodeagent.telemetry.server import metrics_server

pytestmark = pytest.mark.slow
DEADLINE = 40.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pod(name: str, version: str) -> Workload:
    return Workload(
        uid=name,
        name=name,
        namespace="shop",
        node="n1",
        addresses=("10.0.0.9",),
        labels=MappingProxyType({"app": "my-app", "version": version}),
        annotations=MappingProxyType({}),
        service_account="my-app",
        identity="spiffe://cluster.local/ns/shop/sa/my-app",
    )


async def _get_json(url: str, *args: str) -> Any:
    proc = await trio.run_process(
        ["curl", "-sf", "--max-time", "3", *args, url], capture_stdout=True, check=False
    )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


async def test_prometheus_scrapes_and_sums_by_destination_version(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("needs the Debian package `prometheus` (apt-get install prometheus)")
    reg = MetricsRegistry()
    metrics = IstioMetrics(reg)
    sent = {"v1": 90, "v2": 10}
    for version, n in sent.items():
        peer = peer_labels(
            reporter="destination",
            source=None,
            destination=_pod(f"my-app-{version}-5d4f6b7c9-abcde", version),
            service=None,
            protocol="http",
        )
        for i in range(n):
            code = 500 if i == 0 else 200  # two series per version: the query must sum them
            metrics.record_request(
                peer, response_code=code, duration_ms=i, request_bytes=i, response_bytes=i
            )
    server = metrics_server(reg, lambda: True, host="127.0.0.1", port=0)
    prom_port = _free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: nodeagent\n    metrics_path: /stats/prometheus\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
        )
        with (tmp_path / "prometheus.log").open("wb") as logf:
            proc = await trio.lowlevel.open_process(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--web.enable-lifecycle",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        try:
            api = f"http://127.0.0.1:{prom_port}/api/v1"
            result: dict[str, float] = {}
            target: dict[str, Any] = {}
            with trio.move_on_after(DEADLINE):
                while result != sent:
                    await trio.sleep(0.5)  # polling a real server, not a unit test
                    assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
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
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            nursery.cancel_scope.cancel()
    log = (tmp_path / "prometheus.log").read_text()
    assert result == sent, f"query gave {result}; prometheus log:\n{log[-3000:]}"
    assert target.get("health") == "up"
    assert target.get("lastError") == ""
