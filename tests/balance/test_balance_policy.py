"""Policy resolution: Istio's precedence (top, port-level, subset, subset port-level), defaults."""

from __future__ import annotations

import pytest
from helpers_balance import rule

from nodeagent.balance import PolicyError, UpstreamTls, resolve
from nodeagent.balance.policy import DEFAULT_POLICY, UNLIMITED


def test_no_rule_is_peak_ewma_without_outlier_detection() -> None:
    p = resolve(None, None, 80)
    assert p == DEFAULT_POLICY
    assert p.load_balancer.kind == "PEAK_EWMA"
    assert p.outlier is None
    assert p.pool.max_connections == UNLIMITED
    assert p.pool.connect_timeout_s == 10.0
    assert p.panic_percent == 50.0


@pytest.mark.parametrize(
    ("simple", "kind"),
    [
        ("ROUND_ROBIN", "ROUND_ROBIN"),
        ("LEAST_REQUEST", "LEAST_REQUEST"),
        ("LEAST_CONN", "LEAST_REQUEST"),
        ("RANDOM", "RANDOM"),
        ("PASSTHROUGH", "PASSTHROUGH"),
        ("UNSPECIFIED", "PEAK_EWMA"),
    ],
)
def test_simple_balancers(simple: str, kind: str) -> None:
    p = resolve(rule({"loadBalancer": {"simple": simple}}), None, 80)
    assert p.load_balancer.kind == kind


def test_consistent_hash_sources_and_algorithms() -> None:
    p = resolve(rule({"loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}}}), None, 80)
    assert p.load_balancer.kind == "RING_HASH"
    assert p.load_balancer.hash is not None
    assert (p.load_balancer.hash.source, p.load_balancer.hash.name) == ("header", "x-user")
    assert p.load_balancer.hash.ring_size == 1024

    doc = {
        "consistentHash": {
            "httpCookie": {"name": "sess", "path": "/", "ttl": "10s"},
            "maglev": {"tableSize": 251},
        }
    }
    p = resolve(rule({"loadBalancer": doc}), None, 80)
    h = p.load_balancer.hash
    assert p.load_balancer.kind == "MAGLEV"
    assert h is not None
    assert (h.source, h.name, h.table_size, h.cookie_ttl_s, h.cookie_path) == (
        "cookie",
        "sess",
        251,
        10.0,
        "/",
    )

    ring = {"consistentHash": {"useSourceIp": True, "ringHash": {"minimumRingSize": 4096}}}
    h = resolve(rule({"loadBalancer": ring}), None, 80).load_balancer.hash
    assert h is not None
    assert (h.source, h.ring_size) == ("source_ip", 4096)

    q = {"consistentHash": {"httpQueryParameterName": "u", "minimumRingSize": 64}}
    h = resolve(rule({"loadBalancer": q}), None, 80).load_balancer.hash
    assert h is not None
    assert (h.source, h.name, h.ring_size) == ("query", "u", 64)


def test_outlier_detection_defaults_and_fields() -> None:
    p = resolve(rule({"outlierDetection": {}}), None, 80)
    assert p.outlier is not None
    assert (p.outlier.consecutive_5xx, p.outlier.consecutive_gateway) == (5, 0)
    assert (p.outlier.interval_s, p.outlier.base_ejection_s) == (10.0, 30.0)
    assert p.outlier.max_ejection_percent == 10.0
    assert p.panic_percent == 50.0

    od = {
        "consecutive5xxErrors": 3,
        "consecutiveGatewayErrors": 2,
        "interval": "1s",
        "baseEjectionTime": "15s",
        "maxEjectionPercent": 100,
        "minHealthPercent": 20,
    }
    p = resolve(rule({"outlierDetection": od}), None, 80)
    assert p.outlier is not None
    assert (p.outlier.consecutive_5xx, p.outlier.consecutive_gateway) == (3, 2)
    assert (p.outlier.interval_s, p.outlier.base_ejection_s) == (1.0, 15.0)
    assert p.outlier.max_ejection_percent == 100.0
    assert p.panic_percent == 20.0


def test_deprecated_consecutive_errors_counts_gateway_errors_only() -> None:
    p = resolve(rule({"outlierDetection": {"consecutiveErrors": 7}}), None, 80)
    assert p.outlier is not None
    assert (p.outlier.consecutive_5xx, p.outlier.consecutive_gateway) == (0, 7)


def test_connection_pool() -> None:
    cp = {
        "tcp": {"maxConnections": 2, "connectTimeout": "250ms", "idleTimeout": "30s"},
        "http": {
            "http1MaxPendingRequests": 3,
            "http2MaxRequests": 9,
            "maxRequestsPerConnection": 4,
            "maxRetries": 1,
            "idleTimeout": "5s",
        },
    }
    pool = resolve(rule({"connectionPool": cp}), None, 80).pool
    assert pool.max_connections == 2
    assert pool.connect_timeout_s == 0.25
    assert pool.tcp_idle_timeout_s == 30.0
    assert pool.max_pending_requests == 3
    assert pool.max_requests == 9
    assert pool.max_requests_per_connection == 4
    assert pool.max_retries == 1
    assert pool.http_idle_timeout_s == 5.0
    # Istio applies the counters only when > 0.
    zero = resolve(rule({"connectionPool": {"tcp": {"maxConnections": 0}}}), None, 80).pool
    assert zero.max_connections == UNLIMITED


def test_precedence_top_port_subset_subset_port() -> None:
    top = {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {"tcp": {"maxConnections": 10}},
        "outlierDetection": {"consecutive5xxErrors": 1},
        "portLevelSettings": [
            {"port": {"number": 9090}, "loadBalancer": {"simple": "RANDOM"}},
        ],
    }
    subsets = [
        {
            "name": "v1",
            "labels": {"v": "1"},
            "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
        },
        {
            "name": "v2",
            "labels": {"v": "2"},
            "trafficPolicy": {
                "connectionPool": {"tcp": {"maxConnections": 5}},
                "portLevelSettings": [
                    {"port": {"number": 80}, "outlierDetection": {"consecutive5xxErrors": 9}}
                ],
            },
        },
    ]
    dr = rule(top, subsets)
    # Top level on port 80.
    p = resolve(dr, None, 80)
    assert p.load_balancer.kind == "ROUND_ROBIN"
    assert p.pool.max_connections == 10
    assert p.outlier is not None
    assert p.outlier.consecutive_5xx == 1
    # Port level replaces all four fields: no inheritance of the pool or outlier detection.
    p = resolve(dr, None, 9090)
    assert p.load_balancer.kind == "RANDOM"
    assert p.pool.max_connections == UNLIMITED
    assert p.outlier is None
    # A subset overrides only what it sets.
    p = resolve(dr, "v1", 80)
    assert p.load_balancer.kind == "LEAST_REQUEST"
    assert p.pool.max_connections == 10
    assert p.outlier is not None
    assert p.outlier.consecutive_5xx == 1
    # Subset on top of the top-level port settings.
    p = resolve(dr, "v1", 9090)
    assert p.load_balancer.kind == "LEAST_REQUEST"
    assert p.pool.max_connections == UNLIMITED
    # The subset's own port-level entry replaces everything again.
    p = resolve(dr, "v2", 80)
    assert p.load_balancer.kind == "PEAK_EWMA"
    assert p.pool.max_connections == UNLIMITED
    assert p.outlier is not None
    assert p.outlier.consecutive_5xx == 9
    p = resolve(dr, "v2", 8080)
    assert p.load_balancer.kind == "ROUND_ROBIN"
    assert p.pool.max_connections == 5
    # An unknown subset: the top-level policy.
    assert resolve(dr, "nope", 80).load_balancer.kind == "ROUND_ROBIN"


@pytest.mark.parametrize(
    ("policy", "path"),
    [
        ({"loadBalancer": {"simple": "FASTEST"}}, "trafficPolicy.loadBalancer.simple"),
        (
            {"outlierDetection": {"interval": "soon"}},
            "trafficPolicy.outlierDetection.interval",
        ),
        (
            {"connectionPool": {"tcp": {"maxConnections": -1}}},
            "trafficPolicy.connectionPool.tcp.maxConnections",
        ),
        (
            {"loadBalancer": {"consistentHash": {"ringHash": {}}}},
            "trafficPolicy.loadBalancer.consistentHash",
        ),
        ({"connectionPool": []}, "trafficPolicy.connectionPool"),
    ],
)
def test_bad_values_name_their_path(policy: dict[str, object], path: str) -> None:
    with pytest.raises(PolicyError) as e:
        resolve(rule(policy), None, 80)
    assert e.value.path == path
    assert str(e.value).startswith(path + ":")


def test_tls_origination_compiles_with_port_level_precedence() -> None:
    doc = {
        "tls": {"mode": "SIMPLE", "caCertificates": "/ca.pem", "sni": "api.example.com"},
        "portLevelSettings": [
            {
                "port": {"number": 8443},
                "tls": {
                    "mode": "MUTUAL",
                    "clientCertificate": "/c.pem",
                    "privateKey": "/k.pem",
                    "subjectAltNames": ["api.example.com"],
                },
            },
            {"port": {"number": 9000}, "tls": {"mode": "ISTIO_MUTUAL"}},
        ],
    }
    assert resolve(rule(doc), None, 80).tls == UpstreamTls(
        "SIMPLE", ca_certificates="/ca.pem", sni="api.example.com"
    )
    # A port-level policy replaces the top-level tls (no inheritance of caCertificates/sni).
    assert resolve(rule(doc), None, 8443).tls == UpstreamTls(
        "MUTUAL",
        subject_alt_names=("api.example.com",),
        client_certificate="/c.pem",
        private_key="/k.pem",
    )
    assert resolve(rule(doc), None, 9000).tls is None  # the mesh's own mTLS
    assert resolve(None, None, 80).tls is None
    with pytest.raises(PolicyError, match=r"trafficPolicy\.tls: MUTUAL needs"):
        resolve(rule({"tls": {"mode": "MUTUAL"}}), None, 80)
