"""The node's telemetry port (TCP 15020): `/stats/prometheus` and `/healthz/ready`.

Same machinery as the admin socket (`nodeagent.httpserver`), on a TCP listener, with only the
read-only endpoints a scraper or a kubelet probe needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from nodeagent.contract import METRICS_PATH, METRICS_PORT, READY_PATH
from nodeagent.httpserver import HttpServerRequest, Response, Route, TcpHttpServer
from nodeagent.telemetry.metrics import CONTENT_TYPE, MetricsRegistry


def prometheus_route(registry: MetricsRegistry) -> Route:
    def handler(_: HttpServerRequest) -> Response:
        return Response.text(registry.render(), content_type=CONTENT_TYPE)

    return Route(handler)


def ready_route(ready: Callable[[], bool]) -> Route:
    def handler(_: HttpServerRequest) -> Response:
        ok = ready()
        return Response.text("ready\n" if ok else "starting\n", 200 if ok else 503)

    return Route(handler)


def telemetry_routes(registry: MetricsRegistry, ready: Callable[[], bool]) -> Mapping[str, Route]:
    return {METRICS_PATH: prometheus_route(registry), READY_PATH: ready_route(ready)}


def metrics_server(
    registry: MetricsRegistry,
    ready: Callable[[], bool],
    *,
    host: str = "0.0.0.0",
    port: int = METRICS_PORT,
) -> TcpHttpServer:
    """`await nursery.start(metrics_server(reg, lambda: agent.ready).run)`; binds before started."""
    return TcpHttpServer(host, port, telemetry_routes(registry, ready), name="telemetry")
