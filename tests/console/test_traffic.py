"""Rates, 5xx ratios and p99 from successive scrapes of the telemetry package's own exposition."""

from __future__ import annotations

import pytest
from console_fixtures import Calls, exposition, mesh

from nodeagent.console.traffic import EdgeKey, TrafficHistory, parse_scrape, quantile


def key(version: str) -> EdgeKey:
    return EdgeKey(
        "default",
        "client",
        "client",
        "default",
        "my-app",
        "default",
        f"my-app-{version}",
        version,
        "http",
    )


def test_rates_come_from_the_increase_between_scrapes() -> None:
    snap = mesh()
    history = TrafficHistory()
    history.record(
        "node-1", 100.0, parse_scrape(exposition(snap, [Calls("c1", "a1", "my-app", {200: 10})]))
    )
    later = [Calls("c1", "a1", "my-app", {200: 60}), Calls("c1", "a2", "my-app", {200: 18, 503: 2})]
    history.record("node-1", 110.0, parse_scrape(exposition(snap, later)))
    edges = {e.key: e for e in history.traffic(now=110.0, seconds=60)}
    assert edges[key("v1")].request_rate == pytest.approx(5.0)
    assert edges[key("v1")].error_ratio == 0.0
    assert edges[key("v2")].request_rate == pytest.approx(2.0)
    assert edges[key("v2")].error_ratio == pytest.approx(0.1)
    assert edges[key("v2")].mtls
    # 20 ms sits in the (10, 25] bucket: p99 interpolates inside it
    p99 = edges[key("v1")].p99_ms
    assert p99 is not None
    assert 10 < p99 <= 25


def test_a_window_older_than_the_history_uses_what_is_there_and_one_scrape_is_no_rate() -> None:
    snap = mesh()
    history = TrafficHistory()
    history.record("node-1", 0.0, parse_scrape(exposition(snap, [])))
    assert history.traffic(now=0.0, seconds=30) == []
    history.record(
        "node-1", 5.0, parse_scrape(exposition(snap, [Calls("c1", "a1", "my-app", {200: 10})]))
    )
    (edge,) = history.traffic(now=5.0, seconds=30)
    assert edge.request_rate == pytest.approx(2.0)
    # a window that starts after the first scrape ignores it
    history.record(
        "node-1", 10.0, parse_scrape(exposition(snap, [Calls("c1", "a1", "my-app", {200: 30})]))
    )
    (edge,) = history.traffic(now=10.0, seconds=6)
    assert edge.request_rate == pytest.approx(4.0)


def test_a_restarted_agent_counts_from_zero_not_negative() -> None:
    snap = mesh()
    history = TrafficHistory()
    history.record(
        "n", 0.0, parse_scrape(exposition(snap, [Calls("c1", "a1", "my-app", {200: 100})]))
    )
    history.record(
        "n", 10.0, parse_scrape(exposition(snap, [Calls("c1", "a1", "my-app", {200: 20})]))
    )
    (edge,) = history.traffic(now=10.0, seconds=60)
    assert edge.request_rate == pytest.approx(2.0)


def test_tcp_connections_are_counted_once_though_both_ends_report_them() -> None:
    snap = mesh()
    history = TrafficHistory()
    history.record("n", 0.0, parse_scrape(exposition(snap, [])))
    history.record(
        "n", 10.0, parse_scrape(exposition(snap, [Calls("a1", "d1", "db", {0: 20}, tcp=True)]))
    )
    (edge,) = history.traffic(now=10.0, seconds=60)
    assert edge.key.protocol == "tcp"
    assert edge.connection_rate == pytest.approx(2.0)
    assert edge.byte_rate == pytest.approx(20 * 110 / 10)


def test_quantile_is_prometheus_histogram_quantile() -> None:
    assert quantile(0.5, {10.0: 50.0, 20.0: 100.0, float("inf"): 100.0}) == pytest.approx(10.0)
    assert quantile(0.99, {10.0: 0.0, 20.0: 100.0, float("inf"): 100.0}) == pytest.approx(19.9)
    assert quantile(0.99, {10.0: 0.0, float("inf"): 5.0}) == 10.0
    assert quantile(0.99, {}) is None


def test_a_malformed_exposition_is_an_error_naming_the_line() -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_scrape("istio_requests_total{ 1\n")
