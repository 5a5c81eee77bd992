"""The admin socket's endpoints, built from callbacks the agent provides.

The agent owns the state; this module only shapes it for operators: `/config_dump`, `/workloads`,
`/certs`, `/stats/prometheus`, `/logging`, `/healthz/ready`, `/quitquitquit`. No private key ever
leaves: every dump is scrubbed of keys that look like key material before it is rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent import log as logconf
from nodeagent.contract import METRICS_PATH, READY_PATH
from nodeagent.httpserver import HttpServerRequest, Response, Route
from nodeagent.telemetry.metrics import MetricsRegistry
from nodeagent.telemetry.server import prometheus_route, ready_route

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_DRAIN_DEADLINE = 5.0
MAX_DRAIN_DEADLINE = 300.0
_SECRET_WORDS = ("private", "secret", "key_pem", "password", "token")


@dataclass(slots=True)
class AdminSources:
    """What the agent exposes. `drain(deadline_s, park)` must not block: it starts the drain
    (stop accepting, let open connections finish for at most `deadline_s`, then exit; with
    `park`, stay idle until a SIGTERM instead of exiting) and returns."""

    ready: Callable[[], bool]
    config_dump: Callable[[], Mapping[str, Any]]
    workloads: Callable[[], Sequence[Mapping[str, Any]]]
    certs: Callable[[], Sequence[Mapping[str, Any]]]
    drain: Callable[[float, bool], None]
    registry: MetricsRegistry | None = None
    log_level: str = "info"
    set_log_level: Callable[[str], None] = logconf.set_level


def _secret(name: str) -> bool:
    name = name.lower()
    return name.endswith("_key") or any(w in name for w in _SECRET_WORDS)


def scrub(value: Any) -> Any:
    """A copy of `value` without any mapping entry whose key names key material."""
    if isinstance(value, Mapping):
        return {k: scrub(v) for k, v in value.items() if not _secret(str(k))}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def admin_routes(src: AdminSources) -> dict[str, Route]:
    state = {"level": src.log_level}

    def config_dump(_: HttpServerRequest) -> Response:
        dump = dict(src.config_dump())
        dump.setdefault("workloads", list(src.workloads()))
        dump.setdefault("certificates", list(src.certs()))
        return Response.json(scrub(dump))

    def workloads(_: HttpServerRequest) -> Response:
        return Response.json(scrub(list(src.workloads())))

    def certs(_: HttpServerRequest) -> Response:
        return Response.json(scrub(list(src.certs())))

    def logging(req: HttpServerRequest) -> Response:
        level = req.param("level")
        if level is None:
            return Response.json({"level": state["level"]})
        if req.method != "POST":
            raise ValueError("changing the log level needs POST /logging?level=LEVEL")
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}; one of {', '.join(LEVELS)}")
        src.set_log_level(level)
        previous, state["level"] = state["level"], level
        return Response.json({"level": level, "previous": previous})

    def quit(req: HttpServerRequest) -> Response:
        raw = req.param("deadline")
        try:
            deadline = DEFAULT_DRAIN_DEADLINE if raw is None else float(raw)
        except ValueError:
            raise ValueError(f"deadline {raw!r} is not a number of seconds") from None
        if not 0 <= deadline <= MAX_DRAIN_DEADLINE:
            raise ValueError(f"deadline {deadline} s is outside 0..{MAX_DRAIN_DEADLINE:g}")
        then = req.param("then") or "exit"
        if then not in ("exit", "park"):
            raise ValueError(f"then={then!r}: after the drain the agent can only exit or park")
        src.drain(deadline, then == "park")
        return Response.json({"draining": True, "deadline_seconds": deadline, "then": then})

    routes = {
        "/config_dump": Route(config_dump),
        "/workloads": Route(workloads),
        "/certs": Route(certs),
        "/logging": Route(logging, frozenset({"GET", "POST"})),
        READY_PATH: ready_route(src.ready),
        "/quitquitquit": Route(quit, frozenset({"POST"})),
    }
    if src.registry is not None:
        routes[METRICS_PATH] = prometheus_route(src.registry)
    return routes
