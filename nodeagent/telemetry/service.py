"""The agent's telemetry in one object: metrics registry, access log, tracer, and their tasks.

The agent builds one `Telemetry`, hands `telemetry.metrics`, `telemetry.access_log` and
`telemetry.tracer` to the proxies, and starts `telemetry.run` in its nursery: that binds the 15020
endpoint and starts the access-log writer and the Zipkin exporter, and reports started only when
the port is bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from nodeagent.contract import METRICS_PORT
from nodeagent.telemetry.accesslog import AccessLog, Format, TextSink
from nodeagent.telemetry.metrics import (
    HealthSources,
    IstioMetrics,
    MetricsRegistry,
    health_collector,
)
from nodeagent.telemetry.server import metrics_server
from nodeagent.telemetry.tracing import Tracer, ZipkinExporter


@dataclass(slots=True)
class TelemetryConfig:
    service_name: str  # the node name: Zipkin's localEndpoint.serviceName
    metrics_host: str = "0.0.0.0"
    metrics_port: int = METRICS_PORT
    access_log: bool = True
    access_log_format: Format = "json"
    access_log_namespaces: Mapping[str, bool] = field(default_factory=dict)
    zipkin_url: str | None = None  # e.g. http://zipkin.istio-system:9411/api/v2/spans
    sample_rate: float = 0.01  # Istio's default is 1 %


class Telemetry:
    def __init__(
        self,
        config: TelemetryConfig,
        *,
        ready: Callable[[], bool],
        health: HealthSources | None = None,
        access_log_sink: TextSink | None = None,
    ) -> None:
        self.config = config
        self.registry = MetricsRegistry()
        self.metrics = IstioMetrics(self.registry)
        self.access_log = AccessLog(
            fmt=config.access_log_format,
            enabled=config.access_log,
            namespaces=config.access_log_namespaces,
            sink=access_log_sink,
        )
        self.exporter = ZipkinExporter(config.zipkin_url) if config.zipkin_url else None
        self.tracer = Tracer(
            config.service_name, sample_rate=config.sample_rate, exporter=self.exporter
        )
        if health is not None:
            self.registry.add_collector(health_collector(health))
        self.registry.add_collector(self.access_log.collector)
        self.server = metrics_server(
            self.registry, ready, host=config.metrics_host, port=config.metrics_port
        )
        self._serving = trio.CancelScope()

    def stop_serving(self) -> None:
        """Close the 15020 port (a draining agent hands it to its successor); the registry,
        the access log and the exporter go on for the connections still open."""
        self._serving.cancel()

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self._serving:
            await self.server.run(task_status=task_status)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._serve)
            await nursery.start(self.access_log.run)
            if self.exporter is not None:
                await nursery.start(self.exporter.run)
            task_status.started()
