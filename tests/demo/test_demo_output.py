"""The demo's pure helpers: bars, split lines, tables, the binomial interval, and the sums over
Prometheus scrapes (checked against hand-written exposition text)."""

from __future__ import annotations

import pytest

from nodeagent.demo import output as out

_ID = "spiffe://cluster.local/ns/default/sa/"
MTLS = (
    f'reporter="source",source_principal="{_ID}client",'
    f'destination_principal="{_ID}my-app",connection_security_policy="mutual_tls"'
)
PLAIN = (
    f'reporter="destination",source_principal="unknown",'
    f'destination_principal="{_ID}my-app",connection_security_policy="none"'
)
SCRAPE_N1 = """\
# TYPE istio_requests_total counter
istio_requests_total{reporter="source",destination_version="v1.0.0",response_code="200"} 900
istio_requests_total{reporter="source",destination_version="v2.0.0",response_code="200"} 100
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{MTLS} 3
istio_tcp_connections_opened_total{PLAIN} 1
""".replace("{MTLS}", "{" + MTLS + "}").replace("{PLAIN}", "{" + PLAIN + "}")
SCRAPE_N2 = """\
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",destination_version="v2.0.0",response_code="200"} 100
istio_requests_total{reporter="source",destination_version="v1.0.0",response_code="503"} 2
"""


def test_version_of_reads_the_backend_answer() -> None:
    assert out.version_of("version=v2.0.0 path=/x") == "v2.0.0"
    assert out.version_of("no route") is None


@pytest.mark.parametrize(
    ("count", "total", "filled"),
    [(900, 1000, 36), (100, 1000, 4), (1, 1000, 1), (0, 1000, 0), (1000, 1000, 40), (5, 0, 0)],
)
def test_bar_is_proportional_and_visible_when_nonzero(count: int, total: int, filled: int) -> None:
    b = out.bar(count, total)
    assert len(b) == out.BAR_WIDTH
    assert b.count("█") == filled


def test_split_lines_keep_the_configured_order_and_add_strays() -> None:
    lines = out.split_lines({"v2.0.0": 10, "v1.0.0": 90, "-": 0}, ["v1.0.0", "v2.0.0"])
    assert [line.split()[0] for line in lines] == ["v1.0.0", "v2.0.0", "-"]
    assert "90.0%" in lines[0]
    assert "10.0%" in lines[1]


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    lines = out.table(["name", "n"], [("a", 5), ("long-name", 100)])
    assert lines[0].startswith("name     ")
    assert lines[2].endswith("  5")
    assert lines[3] == "long-name  100"


def test_binomial_interval_of_the_canary() -> None:
    low, high = out.binomial_interval(1000, 0.1)
    assert 68 < low < 70
    assert 130 < high < 132
    assert out.binomial_interval(400, 1.0) == (400.0, 400.0)


def test_requests_by_version_sums_every_node() -> None:
    sums, problems = out.requests_by_version({"n1": SCRAPE_N1, "n2": SCRAPE_N2})
    assert problems == []
    assert sums == {
        ("v1.0.0", "source", "200"): 900,
        ("v2.0.0", "source", "200"): 100,
        ("v2.0.0", "destination", "200"): 100,
        ("v1.0.0", "source", "503"): 2,
    }


def test_requests_by_version_names_a_node_whose_scrape_is_broken() -> None:
    sums, problems = out.requests_by_version({"n1": SCRAPE_N1, "n2": "istio_requests_total{ 1\n"})
    assert sum(sums.values()) == 1000
    assert len(problems) == 1
    assert problems[0].startswith("n2: ")


def test_mtls_peers_keeps_only_known_ends() -> None:
    rows = out.mtls_peers({"n1": SCRAPE_N1, "n2": SCRAPE_N2})
    assert rows == [
        (
            "n1",
            "source",
            "cluster.local/ns/default/sa/client",
            "cluster.local/ns/default/sa/my-app",
            "mutual_tls",
            3,
        )
    ]


def test_metric_names_lists_what_a_scrape_has() -> None:
    assert out.metric_names(SCRAPE_N2) == ["istio_requests_total"]
