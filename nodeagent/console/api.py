"""The console's JSON data API and its static page, as `httpserver` routes over one
`ConsoleState`. Pure: the state is what the server last read from the store and scraped from
the agents; handlers only compute from it (the clock is the state's).

    GET /api/graph?window=60     nodes, edges, health over the window (seconds, one of WINDOWS)
    GET /api/node?id=…&window=…  a node's details (versions, routes, policies, certificates)
    GET /api/edge?id=…&window=…  an edge's details (and the routes from its source)
    GET /api/health              config health findings
    GET /api/rollouts            the progressive-delivery records
    GET /api/agents              the agents found through the store, and their last scrape
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any

from nodeagent.console.checks import IssuedCert, config_health
from nodeagent.console.details import edge_details, node_details
from nodeagent.console.graph import build_graph
from nodeagent.console.traffic import TrafficHistory
from nodeagent.httpserver import HttpServerRequest, Response, Route
from nodeagent.snapshot import Snapshot

WINDOWS = (30, 60, 300, 900)  # seconds the window selector offers
DEFAULT_WINDOW = 60
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip


@dataclass(slots=True)
class Agent:
    """A node agent found through the store (`/mesh/v1/nodes/<node>`)."""

    node: str
    metrics: str  # host:port of its 15020
    last_scrape: float | None = None
    error: str | None = None


@dataclass(slots=True)
class ConsoleState:
    """What the console knows; the server replaces the parts as it reads them."""

    snapshot: Snapshot = field(default_factory=Snapshot.empty)
    certs: list[IssuedCert] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    agents: dict[str, Agent] = field(default_factory=dict)
    traffic: TrafficHistory = field(default_factory=TrafficHistory)
    store_error: str | None = None
    refresh_seconds: float = 2.0
    clock: Callable[[], float] = time.time


def _window(request: HttpServerRequest) -> int:
    raw = request.param("window")
    if raw is None:
        return DEFAULT_WINDOW
    if not raw.isdigit() or int(raw) not in WINDOWS:
        raise ValueError(f"window={raw!r}: expected one of {', '.join(map(str, WINDOWS))}")
    return int(raw)


def _required(request: HttpServerRequest, name: str) -> str:
    value = request.param(name)
    if not value:
        raise ValueError(f"missing query parameter {name!r}")
    return value


def graph(state: ConsoleState, window: int) -> dict[str, Any]:
    now = state.clock()
    doc = build_graph(state.snapshot, state.traffic.rates(now, window), window=window)
    doc["windows"] = list(WINDOWS)
    doc["refresh_seconds"] = state.refresh_seconds
    doc["generated"] = now
    doc["agents"] = len(state.agents)
    return doc


def health(state: ConsoleState) -> dict[str, Any]:
    findings = config_health(state.snapshot, state.certs, state.clock())
    return {
        "revision": state.snapshot.revision,
        "store_error": state.store_error,
        "findings": [f.as_dict() for f in findings],
    }


def agents(state: ConsoleState) -> dict[str, Any]:
    return {
        "agents": [
            {"node": a.node, "metrics": a.metrics, "last_scrape": a.last_scrape, "error": a.error}
            for a in sorted(state.agents.values(), key=lambda a: a.node)
        ]
    }


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files (package data) by URL path; `/` is index.html."""
    out: dict[str, tuple[bytes, str]] = {}
    root = resources.files("nodeagent.console") / "static"
    for entry in root.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            out["/" + entry.name] = (entry.read_bytes(), _TYPES[suffix])
    out["/"] = out["/index.html"]
    return out


def routes(state: ConsoleState) -> dict[str, Route]:
    """Every path the console serves (all read-only: GET and HEAD)."""

    def api(compute: Callable[[HttpServerRequest], Mapping[str, Any]]) -> Route:
        return Route(lambda request: Response.json(compute(request)))

    def lookup(kind: str) -> Callable[[HttpServerRequest], Mapping[str, Any]]:
        def compute(request: HttpServerRequest) -> Mapping[str, Any]:
            ident = _required(request, "id")
            doc = graph(state, _window(request))
            details = node_details if kind == "node" else edge_details
            try:
                return details(state.snapshot, doc, ident, state.certs, state.clock())
            except KeyError:
                raise ValueError(f"no {kind} {ident!r} in the graph") from None

        return compute

    table: dict[str, Route] = {
        "/api/graph": api(lambda r: graph(state, _window(r))),
        "/api/node": api(lookup("node")),
        "/api/edge": api(lookup("edge")),
        "/api/health": api(lambda r: health(state)),
        "/api/rollouts": api(lambda r: {"rollouts": state.rollouts}),
        "/api/agents": api(lambda r: agents(state)),
    }
    for path, (body, content_type) in static_files().items():
        table[path] = Route(partial(_static, Response(200, body, content_type, _NO_CACHE)))
    return table


_NO_CACHE = (("cache-control", "no-cache"),)


def _static(response: Response, request: HttpServerRequest) -> Response:
    return response
