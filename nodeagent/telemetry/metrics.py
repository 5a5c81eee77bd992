"""Metrics: a tiny registry in the Prometheus text format 0.0.4, and Istio's standard metrics.

Counters, gauges and histograms keep one value per label-value tuple; recording is a dict lookup
and an add, so the proxy can call it per request. Callback collectors produce gauges at scrape time
(the agent's health: enrolled pods, certificate expiry, store revision…), so nothing has to push
them. `IstioMetrics` holds the eight standard Istio metrics with exactly Istio's label names, and
`peer_labels()` derives those labels from workloads and services with Istio's rules, once per
connection.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from nodeagent.snapshot.model import Service, Workload

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN = "unknown"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# Istio's (Envoy stats filter) default buckets, so Istio's dashboards' quantiles line up.
DURATION_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip
SIZE_BUCKETS_BYTES = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)

Labels = tuple[str, ...]


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metric(Protocol):
    name: str

    def render(self, out: list[str]) -> None: ...


class _Family:
    kind: Literal["counter", "gauge", "histogram"]

    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a valid Prometheus name")
        for label in label_names:
            if not _LABEL_NAME.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"metric {name}: label name {label!r} is not allowed")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"metric {name}: duplicate label names {label_names}")
        self.name = name
        self.help = help
        self.label_names = tuple(label_names)

    def _check(self, labels: Labels) -> None:
        if len(labels) != len(self.label_names):
            raise ValueError(
                f"metric {self.name}: {len(labels)} label values for labels {self.label_names}"
            )

    def _header(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.kind}\n")


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help, label_names)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (inc by {amount})")
        values = self.values
        if labels in values:
            values[labels] += amount
        else:
            self._check(labels)
            values[labels] = amount

    def get(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0.0)

    def render(self, out: list[str]) -> None:
        self._header(out)
        for labels, value in sorted(self.values.items()):
            out.append(
                f"{self.name}{_label_text(self.label_names, labels)} {format_value(value)}\n"
            )


class Gauge(Counter):
    kind = "gauge"  # type: ignore[assignment]

    def set(self, labels: Labels, value: float) -> None:
        self._check(labels)
        self.values[labels] = value

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        if labels not in self.values:
            self._check(labels)
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def dec(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.inc(labels, -amount)


class _Series:
    __slots__ = ("count", "counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0
        self.count = 0


class Histogram(_Family):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, label_names: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help, label_names)
        if not buckets or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"histogram {name}: buckets must be increasing and unique")
        self.buckets = tuple(float(b) for b in buckets if not math.isinf(b))
        self.series: dict[Labels, _Series] = {}

    def series_for(self, labels: Labels) -> _Series:
        series = self.series.get(labels)
        if series is None:
            self._check(labels)
            series = self.series[labels] = _Series(len(self.buckets))
        return series

    def observe(self, labels: Labels, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series_for(labels)
        # Non-cumulative counts here; render() accumulates, so observe stays O(buckets) at worst.
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                series.counts[i] += 1
                break
        series.sum += value
        series.count += 1

    def render(self, out: list[str]) -> None:
        self._header(out)
        names = self.label_names
        for labels, series in sorted(self.series.items()):
            running = 0
            for bound, n in zip(self.buckets, series.counts, strict=True):
                running += n
                le = f'le="{format_value(bound)}"'
                out.append(f"{self.name}_bucket{_label_text(names, labels, le)} {running}\n")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_label_text(names, labels, inf)} {series.count}\n")
            lt = _label_text(names, labels)
            out.append(f"{self.name}_sum{lt} {format_value(series.sum)}\n")
            out.append(f"{self.name}_count{lt} {series.count}\n")


Collector = Callable[[], Iterable[Metric]]
_M = TypeVar("_M", bound=Metric)


class MetricsRegistry:
    """Named metrics plus scrape-time collectors; `render()` is the /stats/prometheus body.

    `add_peers` adds other processes' registries (their `state()`, nodeagent.telemetry.merge):
    each registered family is rendered as the sum of this registry's values and theirs."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Collector] = []
        self._peers: Callable[[], Iterable[list[dict[str, object]]]] | None = None

    def add_peers(self, peers: Callable[[], Iterable[list[dict[str, object]]]]) -> None:
        """`peers()` is called at every render: the other registries' states to add."""
        self._peers = peers

    def state(self) -> list[dict[str, object]]:
        """Every registered family as data (nodeagent.telemetry.merge.FamilyState)."""
        from nodeagent.telemetry.merge import family_state

        return [s for m in self._metrics.values() if (s := family_state(m)) is not None]

    def _merged(self) -> dict[str, Metric]:
        if self._peers is None:
            return self._metrics
        from nodeagent.telemetry.merge import merge_states, metric_of

        merged = merge_states([self.state(), *self._peers()])
        out = dict(self._metrics)
        out.update({name: metric_of(fam) for name, fam in merged.families.items()})
        return out

    def register(self, metric: _M) -> _M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, label_names: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help, label_names))

    def gauge(self, name: str, help: str, label_names: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, help, label_names))

    def histogram(
        self, name: str, help: str, label_names: Sequence[str], buckets: Sequence[float]
    ) -> Histogram:
        return self.register(Histogram(name, help, label_names, buckets))

    def add_collector(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def render(self) -> str:
        out: list[str] = []
        metrics = self._merged()
        seen = set(metrics)
        for name in sorted(metrics):
            metrics[name].render(out)
        for collector in self._collectors:
            for metric in collector():
                if metric.name in seen:  # a family may appear once per exposition
                    raise ValueError(f"collector produced duplicate metric {metric.name}")
                seen.add(metric.name)
                metric.render(out)
        return "".join(out)


# -- Istio's standard metrics ----------------------------------------------------------------------

PEER_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
)
REQUEST_LABELS = (
    *PEER_LABELS,
    "response_code",
    "grpc_response_status",  # "" unless the request was gRPC, as Istio's
    "response_flags",
    "connection_security_policy",
)
# Istio's TCP metrics carry no response_code.
TCP_LABELS = (*PEER_LABELS, "response_flags", "connection_security_policy")

_DEPLOYMENT_POD = re.compile(r"(?P<name>.+)-[a-z0-9]{6,10}-[a-z0-9]{5}\Z")
_GENERATED_POD = re.compile(r"(?P<name>.+)-[a-z0-9]{5}\Z")


def workload_name(pod_name: str) -> str:
    """The Deployment-ish name of a pod, as Istio labels it: `reviews-v1-5d4f6b7c9-x2x7k` →
    `reviews-v1`; `node-agent-x2x7k` (DaemonSet, Job) → `node-agent`; otherwise the pod name."""
    for pattern in (_DEPLOYMENT_POD, _GENERATED_POD):
        m = pattern.match(pod_name)
        if m:
            return m.group("name")
    return pod_name or UNKNOWN


def app_label(labels: Mapping[str, str]) -> str:
    return (
        labels.get("app")
        or labels.get("app.kubernetes.io/name")
        or labels.get("service.istio.io/canonical-name")
        or UNKNOWN
    )


def version_label(labels: Mapping[str, str]) -> str:
    return (
        labels.get("version")
        or labels.get("app.kubernetes.io/version")
        or labels.get("service.istio.io/canonical-revision")
        or UNKNOWN
    )


Reporter = Literal["source", "destination"]
SecurityPolicy = Literal["mutual_tls", "none"]


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """The label values fixed for one connection; compute once, record many requests with it."""

    values: Labels

    def as_dict(self) -> dict[str, str]:
        return dict(zip(PEER_LABELS, self.values, strict=True))


def peer_labels(
    *,
    reporter: Reporter,
    source: Workload | None,
    destination: Workload | None,
    service: Service | None,
    protocol: str,
    source_principal: str | None = None,
    destination_principal: str | None = None,
) -> PeerLabels:
    """Istio's labels for a connection from `source` to `destination` (either may be unknown:
    a client outside the mesh, or an external destination). Principals default to the
    workloads' identities; pass the verified peer identity when mTLS established one."""

    def side(w: Workload | None, principal: str | None) -> tuple[str, str, str, str, str]:
        if w is None:
            return UNKNOWN, UNKNOWN, principal or UNKNOWN, UNKNOWN, UNKNOWN
        return (
            workload_name(w.name),
            w.namespace,
            principal or w.identity or UNKNOWN,
            app_label(w.labels),
            version_label(w.labels),
        )

    if service is not None:
        svc = (service.hostname, service.name, service.namespace)
    else:
        svc = (UNKNOWN, UNKNOWN, UNKNOWN)
    return PeerLabels(
        (
            reporter,
            *side(source, source_principal),
            *side(destination, destination_principal),
            *svc,
            protocol,
        )
    )


class IstioMetrics:
    """The standard Istio metrics. Each record call is a few dict updates and never blocks."""

    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.requests = r.counter("istio_requests_total", "Requests handled.", REQUEST_LABELS)
        self.duration = r.histogram(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds.",
            REQUEST_LABELS,
            DURATION_BUCKETS_MS,
        )
        self.request_bytes = r.histogram(
            "istio_request_bytes", "Request body sizes.", REQUEST_LABELS, SIZE_BUCKETS_BYTES
        )
        self.response_bytes = r.histogram(
            "istio_response_bytes", "Response body sizes.", REQUEST_LABELS, SIZE_BUCKETS_BYTES
        )
        self.tcp_sent = r.counter(
            "istio_tcp_sent_bytes_total", "Bytes sent to the client on TCP connections.", TCP_LABELS
        )
        self.tcp_received = r.counter(
            "istio_tcp_received_bytes_total",
            "Bytes received from the client on TCP connections.",
            TCP_LABELS,
        )
        self.tcp_opened = r.counter(
            "istio_tcp_connections_opened_total", "TCP connections opened.", TCP_LABELS
        )
        self.tcp_closed = r.counter(
            "istio_tcp_connections_closed_total", "TCP connections closed.", TCP_LABELS
        )
        self.self_calls_refused = r.counter(
            "istio_self_calls_refused_total",
            "Connections refused because their target is one of the agent's own listeners "
            "(they would loop through the agent).",
            ("listener", "destination_port"),
        )

    def record_request(
        self,
        peer: PeerLabels,
        *,
        response_code: int,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        response_flags: str = "-",
        security_policy: SecurityPolicy = "none",
        grpc_status: int | None = None,
    ) -> None:
        grpc = "" if grpc_status is None else str(grpc_status)
        labels = (*peer.values, str(response_code), grpc, response_flags, security_policy)
        self.requests.inc(labels)
        self.duration.observe(labels, duration_ms)
        self.request_bytes.observe(labels, request_bytes)
        self.response_bytes.observe(labels, response_bytes)

    def self_call_refused(self, listener: str, port: int) -> None:
        """A connection on `listener` (outbound, inbound, tunnel) named agent port `port`."""
        self.self_calls_refused.inc((listener, str(port)))

    def connection_opened(
        self, peer: PeerLabels, *, security_policy: SecurityPolicy = "none"
    ) -> Labels:
        """Count an opened connection; returns the label tuple to pass to `connection_closed`."""
        labels = (*peer.values, "-", security_policy)
        self.tcp_opened.inc(labels)
        return labels

    def connection_closed(
        self, labels: Labels, *, sent: int, received: int, response_flags: str = "-"
    ) -> None:
        if response_flags != "-":
            labels = (*labels[:-2], response_flags, labels[-1])
        self.tcp_closed.inc(labels)
        if sent:
            self.tcp_sent.inc(labels, sent)
        if received:
            self.tcp_received.inc(labels, received)


# -- the agent's own health ------------------------------------------------------------------------


@dataclass(slots=True)
class HealthSources:
    """Callbacks the agent provides; each is read at scrape time. None leaves a gauge out."""

    enrolled_pods: Callable[[], int] | None = None
    # SPIFFE id → certificate notAfter as a unix timestamp
    certificate_expiry: Callable[[], Mapping[str, float]] | None = None
    store_revision: Callable[[], int] | None = None
    # seconds since the snapshot last caught up with the store (0 when in sync)
    store_lag_seconds: Callable[[], float] | None = None
    config_rejections: Callable[[], int] | None = None
    # direction ("inbound"/"outbound") → open connections
    open_connections: Callable[[], Mapping[str, int]] | None = None
    clock: Callable[[], float] = time.time


def health_collector(src: HealthSources) -> Collector:
    def collect() -> Iterable[Metric]:
        out: list[Metric] = []

        def scalar(name: str, help: str, value: float, kind: type[Gauge] = Gauge) -> None:
            g = kind(name, help)
            g.values[()] = value
            out.append(g)

        if src.enrolled_pods is not None:
            scalar("nodeagent_enrolled_pods", "Pods enrolled on this node.", src.enrolled_pods())
        if src.certificate_expiry is not None:
            g = Gauge(
                "nodeagent_certificate_expiry_seconds",
                "Seconds until each workload certificate expires.",
                ("identity",),
            )
            now = src.clock()
            for identity, not_after in src.certificate_expiry().items():
                g.set((identity,), not_after - now)
            out.append(g)
        if src.store_revision is not None:
            scalar(
                "nodeagent_store_revision", "Store revision of the current snapshot.",
                src.store_revision(),
            )  # fmt: skip
        if src.store_lag_seconds is not None:
            scalar(
                "nodeagent_store_lag_seconds",
                "Seconds the snapshot has been behind the store.",
                src.store_lag_seconds(),
            )
        if src.config_rejections is not None:
            c = Counter("nodeagent_config_rejections_total", "Config resources rejected.")
            c.values[()] = src.config_rejections()
            out.append(c)
        if src.open_connections is not None:
            g = Gauge(
                "nodeagent_open_connections", "Connections open in the proxy.", ("direction",)
            )
            for direction, n in src.open_connections().items():
                g.set((direction,), n)
            out.append(g)
        return out

    return collect
