"""The metrics registry, Istio's labels, and the text format parsed back by a strict parser."""

from __future__ import annotations

import math
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.snapshot.model import Service, ServicePort, Workload
from nodeagent.telemetry import exposition
from nodeagent.telemetry.metrics import (
    DURATION_BUCKETS_MS,
    REQUEST_LABELS,
    TCP_LABELS,
    Counter,
    HealthSources,
    Histogram,
    IstioMetrics,
    MetricsRegistry,
    app_label,
    health_collector,
    peer_labels,
    version_label,
    workload_name,
)


def _workload(name: str, ns: str, labels: dict[str, str], sa: str = "default") -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace=ns,
        node="node-1",
        addresses=("10.0.0.1",),
        labels=MappingProxyType(labels),
        annotations=MappingProxyType({}),
        service_account=sa,
        identity=f"spiffe://cluster.local/ns/{ns}/sa/{sa}",
    )


SERVICE = Service(
    kind="Service",
    namespace="shop",
    name="my-app",
    hosts=("my-app.shop.svc.cluster.local",),
    addresses=("10.96.0.10",),
    ports=(ServicePort("http", 80, 8080),),
    selector=MappingProxyType({"app": "my-app"}),
)


def test_counter_gauge_render_and_parse_back() -> None:
    reg = MetricsRegistry()
    c = reg.counter("demo_total", "A counter\nwith a \\ newline.", ("path",))
    g = reg.gauge("demo_gauge", "A gauge.")
    c.inc(('a"b\\c\nd',), 3)
    c.inc(('a"b\\c\nd',))
    g.set((), 2.5)
    g.dec()
    text = reg.render()
    assert "# HELP demo_total A counter\\nwith a \\\\ newline.\n" in text
    assert 'demo_total{path="a\\"b\\\\c\\nd"} 4\n' in text
    fams = exposition.parse(text)
    assert fams["demo_total"].kind == "counter"
    assert fams["demo_total"].help == "A counter\nwith a \\ newline."
    assert fams["demo_total"].samples[0].labels == {"path": 'a"b\\c\nd'}
    assert fams["demo_total"].samples[0].value == 4
    assert fams["demo_gauge"].samples[0].value == 1.5


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    reg = MetricsRegistry()
    h = reg.histogram("lat_ms", "Latency.", ("route",), DURATION_BUCKETS_MS)
    for v in (0.3, 0.5, 7, 7, 4000, 10**7):
        h.observe(("r",), v)
    text = reg.render()
    fam = exposition.parse(text)["lat_ms"]
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name == "lat_ms_bucket"}
    assert buckets["0.5"] == 2  # le is inclusive
    assert buckets["1"] == 2
    assert buckets["10"] == 4
    assert buckets["5000"] == 5
    assert buckets["3600000"] == 5
    assert buckets["+Inf"] == 6
    assert list(buckets)[-1] == "+Inf"
    (total,) = [s.value for s in fam.samples if s.name == "lat_ms_sum"]
    assert total == pytest.approx(0.3 + 0.5 + 7 + 7 + 4000 + 10**7)
    assert [s.value for s in fam.samples if s.name == "lat_ms_count"] == [6]


def test_registry_rejects_bad_names_and_label_counts() -> None:
    reg = MetricsRegistry()
    with pytest.raises(ValueError, match="not a valid Prometheus name"):
        reg.counter("1bad", "x")
    with pytest.raises(ValueError, match="label name 'le'"):
        reg.histogram("h", "x", ("le",), (1, 2))
    c = reg.counter("ok_total", "x", ("a", "b"))
    with pytest.raises(ValueError, match="1 label values"):
        c.inc(("only-one",))
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(("a", "b"), -1)
    with pytest.raises(ValueError, match="already registered"):
        reg.counter("ok_total", "x")
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h2", "x", (), (5, 1))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("x 1", "newline"),
        ('# TYPE x counter\nx{a="1"} one\n', "not a number"),
        ("# TYPE x counter\nx{a=1} 1\n", "malformed labels"),
        ('# TYPE x counter\nx{a="\\t"} 1\n', "invalid escape"),
        ('# TYPE x counter\nx{a="1",a="2"} 1\n', "repeated"),
        ("# TYPE x counter\nx 1\nx 2\n", "duplicate series"),
        ("# TYPE x counter\nx 1\n# TYPE y gauge\ny 1\n# TYPE x counter\n", "appears twice"),
        ("# TYPE x blob\n", "unknown type"),
        ('# TYPE h histogram\nh_bucket{le="1"} 1\nh_count 1\n', "no \\+Inf"),
        ('# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_count 1\n', "cumul"),
        ('# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_count 1\n', "_count"),
        ("# TYPE h histogram\nh 1\n", "without suffix"),
    ],
)
def test_strict_parser_rejects(text: str, why: str) -> None:
    with pytest.raises(exposition.ExpositionError, match=why):
        exposition.parse(text)


@given(
    st.lists(
        st.tuples(st.text(max_size=20), st.floats(min_value=0, max_value=1e12)),
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_any_label_value_round_trips(series: list[tuple[str, float]]) -> None:
    c = Counter("rt_total", "round trip", ("v",))
    for label, value in series:
        c.inc((label,), value)
    out: list[str] = []
    c.render(out)
    fam = exposition.parse("".join(out))["rt_total"]
    got = {s.labels["v"]: s.value for s in fam.samples}
    assert got == pytest.approx(dict(series))


@pytest.mark.parametrize(
    ("pod", "workload"),
    [
        ("reviews-v1-5d4f6b7c9-x2x7k", "reviews-v1"),
        ("my-app-v2-7f9c8d6b5f-abcde", "my-app-v2"),
        ("node-agent-x2x7k", "node-agent"),
        ("db-0", "db-0"),
        ("client", "client"),
        ("", "unknown"),
    ],
)
def test_workload_name_is_the_deployment_name(pod: str, workload: str) -> None:
    assert workload_name(pod) == workload


def test_app_and_version_fall_back_like_istio() -> None:
    assert app_label({"app": "a", "app.kubernetes.io/name": "b"}) == "a"
    assert app_label({"app.kubernetes.io/name": "b"}) == "b"
    assert app_label({"service.istio.io/canonical-name": "c"}) == "c"
    assert app_label({}) == "unknown"
    assert version_label({"version": "v1"}) == "v1"
    assert version_label({"service.istio.io/canonical-revision": "r2"}) == "r2"
    assert version_label({}) == "unknown"


def test_istio_request_metrics_have_exactly_istios_labels() -> None:
    reg = MetricsRegistry()
    metrics = IstioMetrics(reg)
    client = _workload("client-6b9f8c7d5-abcde", "shop", {"app": "client"}, sa="client")
    v2 = _workload("my-app-v2-7f9c8d6b5f-zzzzz", "shop", {"app": "my-app", "version": "v2"})
    peer = peer_labels(
        reporter="destination",
        source=client,
        destination=v2,
        service=SERVICE,
        protocol="http",
    )
    metrics.record_request(
        peer,
        response_code=200,
        duration_ms=12.5,
        request_bytes=10,
        response_bytes=2000,
        security_policy="mutual_tls",
    )
    metrics.record_request(
        peer, response_code=200, duration_ms=3, request_bytes=0, response_bytes=5,
        security_policy="mutual_tls",
    )  # fmt: skip
    fams = exposition.parse(reg.render())
    (req,) = fams["istio_requests_total"].samples
    assert set(req.labels) == set(REQUEST_LABELS)
    assert req.value == 2
    assert req.labels == {
        "reporter": "destination",
        "source_workload": "client",
        "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/client",
        "source_app": "client",
        "source_version": "unknown",
        "destination_workload": "my-app-v2",
        "destination_workload_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/default",
        "destination_app": "my-app",
        "destination_version": "v2",
        "destination_service": "my-app.shop.svc.cluster.local",
        "destination_service_name": "my-app",
        "destination_service_namespace": "shop",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",  # Istio's: empty unless the request was gRPC
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    counts = list(fams["istio_request_duration_milliseconds"].samples)
    assert {s.name for s in counts} == {
        "istio_request_duration_milliseconds_bucket",
        "istio_request_duration_milliseconds_sum",
        "istio_request_duration_milliseconds_count",
    }
    (size_sum,) = [s for s in fams["istio_response_bytes"].samples if s.name.endswith("_sum")]
    assert size_sum.value == 2005


def test_tcp_metrics_open_close_and_bytes() -> None:
    reg = MetricsRegistry()
    metrics = IstioMetrics(reg)
    peer = peer_labels(
        reporter="source", source=None, destination=None, service=None, protocol="tcp",
        source_principal="spiffe://cluster.local/ns/a/sa/b",
    )  # fmt: skip
    labels = metrics.connection_opened(peer, security_policy="mutual_tls")
    metrics.connection_closed(labels, sent=100, received=7)
    labels2 = metrics.connection_opened(peer)
    metrics.connection_closed(labels2, sent=0, received=0, response_flags="UF")
    text = reg.render()
    opened = exposition.samples(text, "istio_tcp_connections_opened_total")
    assert sum(s.value for s in opened) == 2
    assert all(set(s.labels) == set(TCP_LABELS) for s in opened)
    closed = exposition.samples(text, "istio_tcp_connections_closed_total")
    assert {
        (s.labels["response_flags"], s.labels["connection_security_policy"]) for s in closed
    } == {
        ("-", "mutual_tls"),
        ("UF", "none"),
    }
    (sent,) = exposition.samples(text, "istio_tcp_sent_bytes_total")
    assert sent.value == 100
    assert sent.labels["source_principal"] == "spiffe://cluster.local/ns/a/sa/b"
    assert sent.labels["destination_workload"] == "unknown"
    (received,) = exposition.samples(text, "istio_tcp_received_bytes_total")
    assert received.value == 7


def test_health_collector_reads_callbacks_at_scrape_time() -> None:
    reg = MetricsRegistry()
    pods = [1, 2]
    reg.add_collector(
        health_collector(
            HealthSources(
                enrolled_pods=lambda: len(pods),
                certificate_expiry=lambda: {"spiffe://cluster.local/ns/a/sa/b": 1000.0 + 3600},
                store_revision=lambda: 42,
                store_lag_seconds=lambda: 0.0,
                config_rejections=lambda: 3,
                open_connections=lambda: {"inbound": 2, "outbound": 5},
                clock=lambda: 1000.0,
            )
        )
    )
    text = reg.render()
    assert exposition.samples(text, "nodeagent_enrolled_pods")[0].value == 2
    pods.append(3)
    text = reg.render()
    assert exposition.samples(text, "nodeagent_enrolled_pods")[0].value == 3
    (expiry,) = exposition.samples(text, "nodeagent_certificate_expiry_seconds")
    assert expiry.value == 3600
    assert exposition.samples(text, "nodeagent_store_revision")[0].value == 42
    assert exposition.samples(text, "nodeagent_config_rejections_total")[0].value == 3
    conns = exposition.samples(text, "nodeagent_open_connections")
    assert {s.labels["direction"]: s.value for s in conns} == {"inbound": 2, "outbound": 5}
    assert not math.isnan(exposition.samples(text, "nodeagent_store_lag_seconds")[0].value)
