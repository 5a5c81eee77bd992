"""Traffic from the agents' own Istio metrics: parse one scrape, keep successive scrapes per
agent, and turn the increase over a window into rates, 5xx ratios and p99 per edge.

An edge is (source, destination service, destination workload, protocol); its counters are summed
over the agents that report it. Requests are counted on the reporter that sees them (HTTP is
reported by the client side's proxy, "source"; TCP connections by both ends, of which the
"source" side is taken when it reported the edge, else "destination"), so nothing counts twice.
Pure: times are passed in, nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nodeagent.telemetry.exposition import ExpositionError, parse

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_SENT = "istio_tcp_sent_bytes_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"
# Scrapes kept per agent: enough for the longest window at the scrape interval the server uses.
MAX_SCRAPES = 1024


@dataclass(frozen=True, slots=True, order=True)
class EdgeKey:
    """Who called what, as Istio's labels name it ("unknown" where a side is not in the mesh)."""

    source_namespace: str
    source_workload: str
    source_app: str
    service_namespace: str
    service_name: str
    destination_namespace: str
    destination_workload: str
    destination_version: str
    protocol: str  # http, grpc, tcp


@dataclass(slots=True)
class Counters:
    """One edge's cumulative counters in one scrape (summed over its label series)."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx responses
    buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count
    connections: float = 0.0
    bytes: float = 0.0
    mtls: bool = False

    def add(self, other: Counters) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for le, count in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + count
        self.connections += other.connections
        self.bytes += other.bytes
        self.mtls = self.mtls or other.mtls


Scrape = Mapping[EdgeKey, Counters]


def _key(labels: Mapping[str, str], protocol: str) -> EdgeKey:
    g = labels.get
    return EdgeKey(
        g("source_workload_namespace", "unknown"),
        g("source_workload", "unknown"),
        g("source_app", "unknown"),
        g("destination_service_namespace", "unknown"),
        g("destination_service_name", "unknown"),
        g("destination_workload_namespace", "unknown"),
        g("destination_workload", "unknown"),
        g("destination_version", "unknown"),
        protocol,
    )


def parse_scrape(text: str) -> dict[EdgeKey, Counters]:
    """One agent's `/stats/prometheus` → counters per edge. Raises ValueError (naming the line)
    on a malformed exposition."""
    try:
        families = parse(text)
    except ExpositionError as exc:
        raise ValueError(f"metrics: {exc}") from None
    by_reporter: dict[str, dict[EdgeKey, Counters]] = {"source": {}, "destination": {}}

    def counters(labels: Mapping[str, str], protocol: str) -> Counters | None:
        table = by_reporter.get(labels.get("reporter", ""))
        if table is None:
            return None
        key = _key(labels, protocol)
        found = table.get(key)
        if found is None:
            found = table[key] = Counters()
        if labels.get("connection_security_policy") == "mutual_tls":
            found.mtls = True
        return found

    if REQUESTS in families:
        for s in families[REQUESTS].samples:
            c = counters(s.labels, s.labels.get("request_protocol", "http"))
            if c is not None:
                c.requests += s.value
                if s.labels.get("response_code", "").startswith("5"):
                    c.errors += s.value
    if DURATION in families:
        for s in families[DURATION].samples:
            if s.name != DURATION + "_bucket":
                continue
            c = counters(s.labels, s.labels.get("request_protocol", "http"))
            if c is not None:
                le = float(s.labels["le"])
                c.buckets[le] = c.buckets.get(le, 0.0) + s.value
    for name in (TCP_OPENED, TCP_SENT, TCP_RECEIVED):
        if name not in families:
            continue
        for s in families[name].samples:
            c = counters(s.labels, "tcp")
            if c is None:
                continue
            if name == TCP_OPENED:
                c.connections += s.value
            else:
                c.bytes += s.value
    out = dict(by_reporter["source"])
    for key, c in by_reporter["destination"].items():
        if key in out:
            out[key].mtls = out[key].mtls or c.mtls
        else:
            out[key] = c
    return out


@dataclass(frozen=True, slots=True)
class EdgeTraffic:
    """One edge over a window: per-second rates, the 5xx ratio and p99 (ms, None: no data)."""

    key: EdgeKey
    request_rate: float
    error_rate: float  # 5xx per second
    error_ratio: float  # 5xx / requests, 0 without requests
    p99_ms: float | None
    connection_rate: float
    byte_rate: float
    mtls: bool


def _increase(new: float, old: float) -> float:
    return new - old if new >= old else new  # a reset counter started again from zero


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' `histogram_quantile` on cumulative bucket increments (le → count)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower_bound  # beyond the highest finite bucket: its bound, as Prometheus
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


def per_second(old: Scrape, new: Scrape, seconds: float) -> dict[EdgeKey, Counters]:
    """The increase of every counter from `old` to `new` over `seconds`, per second (an edge
    absent before grew from 0)."""
    out: dict[EdgeKey, Counters] = {}
    span = max(seconds, 1e-9)
    for key, n in new.items():
        o = old.get(key) or Counters()
        reset = n.requests < o.requests
        out[key] = Counters(
            requests=_increase(n.requests, o.requests) / span,
            errors=(n.errors if reset else _increase(n.errors, o.errors)) / span,
            buckets={
                le: _increase(v, o.buckets.get(le, 0.0)) / span for le, v in n.buckets.items()
            },
            connections=_increase(n.connections, o.connections) / span,
            bytes=_increase(n.bytes, o.bytes) / span,
            mtls=n.mtls,
        )
    return out


def summarize(rates: Mapping[EdgeKey, Counters]) -> list[EdgeTraffic]:
    """Per-second counters → each edge's traffic, in a stable order."""
    return [
        EdgeTraffic(
            key=key,
            request_rate=c.requests,
            error_rate=c.errors,
            error_ratio=c.errors / c.requests if c.requests > 0 else 0.0,
            p99_ms=quantile(0.99, c.buckets),
            connection_rate=c.connections,
            byte_rate=c.bytes,
            mtls=c.mtls,
        )
        for key, c in sorted(rates.items())
    ]


class TrafficHistory:
    """Successive scrapes per agent (bounded), and the traffic of any window over them."""

    def __init__(self, max_scrapes: int = MAX_SCRAPES) -> None:
        self._scrapes: dict[str, deque[tuple[float, Scrape]]] = {}
        self._max = max_scrapes

    def record(self, agent: str, at: float, scrape: Scrape) -> None:
        self._scrapes.setdefault(agent, deque(maxlen=self._max)).append((at, scrape))

    def forget(self, agents: Iterable[str]) -> None:
        for agent in agents:
            self._scrapes.pop(agent, None)

    def agents(self) -> dict[str, float]:
        """Each agent's last scrape time."""
        return {a: s[-1][0] for a, s in self._scrapes.items() if s}

    def traffic(self, now: float, seconds: float) -> list[EdgeTraffic]:
        return summarize(self.rates(now, seconds))

    def rates(self, now: float, seconds: float) -> dict[EdgeKey, Counters]:
        """Edges over the last `seconds`: per agent, the newest scrape against the oldest one
        inside the window (the span actually covered is the divisor), summed over agents."""
        total: dict[EdgeKey, Counters] = {}
        for scrapes in self._scrapes.values():
            if len(scrapes) < 2:
                continue
            newest_at, newest = scrapes[-1]
            start = next(((t, s) for t, s in scrapes if t >= now - seconds and t < newest_at), None)
            if start is None:
                continue
            for key, c in per_second(start[1], newest, newest_at - start[0]).items():
                total.setdefault(key, Counters()).add(c)
        return total
