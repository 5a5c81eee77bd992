"""A real Prometheus (Debian `prometheus`) scraping a test's metrics endpoint on loopback, and the
labels of requests to the `my-app` pods (namespace shop) that the telemetry and rollout tests
record for it."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import pytest
import trio

from nodeagent.snapshot.model import Service, Workload
from nodeagent.telemetry.metrics import PeerLabels, Reporter, peer_labels


def free_port() -> int:
    """A loopback TCP port nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def to_my_app(reporter: Reporter, version: str, service: Service | None = None) -> PeerLabels:
    """The labels of HTTP requests from outside the mesh to the `my-app` pod of `version`
    (labels app, version; the mesh identity of its service account), through `service`."""
    name = f"my-app-{version}-5d4f6b7c9-abcde"
    pod = Workload(
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
    return peer_labels(
        reporter=reporter, source=None, destination=pod, service=service, protocol="http"
    )


class Prometheus(NamedTuple):
    url: str  # http://127.0.0.1:<port>
    process: trio.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@asynccontextmanager
async def prometheus_scraping(tmp_path: Path, target: str) -> AsyncIterator[Prometheus]:
    """A Prometheus scraping `target` (host:port)'s /stats/prometheus every second, its data
    and its log (tmp_path/prometheus.log) under `tmp_path`; stopped on the way out (SIGTERM,
    SIGKILL after 10 s). Fails the test when the package is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("needs the Debian package `prometheus` (apt-get install prometheus)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: nodeagent\n    metrics_path: /stats/prometheus\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as logf:
        proc = await trio.lowlevel.open_process(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
