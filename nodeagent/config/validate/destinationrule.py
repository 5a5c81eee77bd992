"""DestinationRule (networking.istio.io): subsets and traffic policy with Istio's rules.

Supported: host, subsets (name, labels, trafficPolicy), exportTo, trafficPolicy with
loadBalancer (simple; consistentHash by header, cookie, source IP or query parameter with
ringHash or maglev; warmup), connectionPool (tcp, http), outlierDetection, tls (DISABLE, SIMPLE,
MUTUAL with file paths, ISTIO_MUTUAL) and portLevelSettings. Not supported: localityLbSetting,
tunnel, proxyProtocol, retryBudget, workloadSelector, tls.credentialName, tls.caCrl.
"""

from __future__ import annotations

from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Validator,
    Walker,
    boolean,
    duration,
    enum,
    integer,
    list_of,
    number,
    obj,
    port_number,
    string,
    unique,
    with_checks,
)
from nodeagent.config.validate.common import (
    dns1123_label,
    export_to,
    header_name,
    hostname,
    labels,
)

MAX_MAGLEV_TABLE = 5_000_011


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _maglev_size(w: Walker, path: str, value: Any) -> None:
    integer(minimum=1, maximum=MAX_MAGLEV_TABLE - 1)(w, path, value)
    in_range = (
        isinstance(value, int) and not isinstance(value, bool) and 1 < value < MAX_MAGLEV_TABLE
    )
    if in_range and not _is_prime(value):
        w.error(path, f"Invalid value: {value}: the table size must be a prime number")


def _consistent_hash_check(w: Walker, path: str, value: Any) -> None:
    keys = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
    present = [k for k in keys if value.get(k) not in (None, False)]
    if not present:
        w.error(path, f"consistentHash needs one of {', '.join(keys)}")
    if value.get("minimumRingSize") is not None and value.get("maglev") is not None:
        w.error(path, "minimumRingSize (deprecated) cannot be used with maglev")


_consistent_hash = obj(
    {
        "httpHeaderName": string(min_len=1, check=header_name),
        "httpCookie": obj(
            {
                "name": string(min_len=1),
                "path": string(),
                "ttl": duration(allow_zero=True),
                "attributes": Unsupported(),
            },
            required=["name"],
        ),
        "useSourceIp": boolean,
        "httpQueryParameterName": string(min_len=1),
        "ringHash": obj({"minimumRingSize": integer(minimum=1, maximum=8_388_608)}),
        "maglev": obj({"tableSize": _maglev_size}),
        "minimumRingSize": integer(minimum=1, maximum=8_388_608),
    },
    one_of=[
        ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"),
        ("ringHash", "maglev"),
    ],
    checks=[_consistent_hash_check],
)

_warmup = obj(
    {
        "duration": duration(),
        "minimumPercent": number(minimum=0, maximum=100, what="must be between 0 and 100"),
        "aggression": number(minimum=0, what="must be at least 0"),
    },
    required=["duration"],
)

_load_balancer = obj(
    {
        "simple": enum(
            ["UNSPECIFIED", "LEAST_CONN", "RANDOM", "ROUND_ROBIN", "LEAST_REQUEST"],
            unsupported=["PASSTHROUGH"],
        ),
        "consistentHash": _consistent_hash,
        "warmupDurationSecs": duration(),
        "warmup": _warmup,
        "localityLbSetting": Unsupported(),
    },
    one_of=[("simple", "consistentHash"), ("warmupDurationSecs", "warmup")],
)

_count = integer(minimum=0, maximum=2**31 - 1)

_connection_pool = obj(
    {
        "tcp": obj(
            {
                "maxConnections": _count,
                "connectTimeout": duration(),
                "tcpKeepalive": obj({"probes": _count, "time": duration(), "interval": duration()}),
                "maxConnectionDuration": duration(),
                "idleTimeout": duration(allow_zero=True),
            }
        ),
        "http": obj(
            {
                "http1MaxPendingRequests": _count,
                "http2MaxRequests": _count,
                "maxRequestsPerConnection": _count,
                "maxRetries": _count,
                "idleTimeout": duration(),
                "http2KeepAlive": obj({"interval": duration(), "timeout": duration()}),
                "h2UpgradePolicy": enum(["DEFAULT"], unsupported=["DO_NOT_UPGRADE", "UPGRADE"]),
                "useClientProtocol": Unsupported(),
                "maxConcurrentStreams": _count,
            }
        ),
    }
)

_outlier_detection = obj(
    {
        "consecutiveErrors": _count,
        "consecutiveGatewayErrors": _count,
        "consecutive5xxErrors": _count,
        "interval": duration(),
        "baseEjectionTime": duration(),
        "maxEjectionPercent": integer(minimum=0, maximum=100, what="must be between 0 and 100"),
        "minHealthPercent": integer(minimum=0, maximum=100, what="must be between 0 and 100"),
        "splitExternalLocalOriginErrors": Unsupported(),
        "consecutiveLocalOriginFailures": Unsupported(),
    }
)


def _tls_check(w: Walker, path: str, value: Any) -> None:
    mode = value.get("mode", "DISABLE")
    if mode not in ("SIMPLE", "MUTUAL"):
        for k in ("sni", "subjectAltNames", "insecureSkipVerify", "caCertificates"):
            if value.get(k) is not None:
                w.error(
                    f"{path}.{k}", f"is only meaningful with mode SIMPLE or MUTUAL (mode is {mode})"
                )
    client, key = value.get("clientCertificate"), value.get("privateKey")
    if mode == "MUTUAL" and (client is None or key is None):
        w.error(path, "MUTUAL TLS requires clientCertificate and privateKey")
    if mode != "MUTUAL":
        for k in ("clientCertificate", "privateKey"):
            if value.get(k) is not None:
                w.error(f"{path}.{k}", f"is only meaningful with mode MUTUAL (mode is {mode})")
    if value.get("insecureSkipVerify") and (
        value.get("caCertificates") is not None or value.get("subjectAltNames")
    ):
        w.error(
            f"{path}.insecureSkipVerify",
            "insecureSkipVerify skips verification: caCertificates/subjectAltNames would be unused",
        )


_tls = obj(
    {
        "mode": enum(["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]),
        "sni": string(min_len=1, check=hostname),
        "subjectAltNames": list_of(string(min_len=1)),
        "insecureSkipVerify": boolean,
        "caCertificates": string(min_len=1),
        "clientCertificate": string(min_len=1),
        "privateKey": string(min_len=1),
        "credentialName": Unsupported("Kubernetes secrets at the source: use file paths"),
        "caCrl": Unsupported(),
    },
    checks=[_tls_check],
)

_port_policy = obj(
    {
        "port": obj({"number": port_number}, required=["number"]),
        "loadBalancer": _load_balancer,
        "connectionPool": _connection_pool,
        "outlierDetection": _outlier_detection,
        "tls": _tls,
    },
    required=["port"],
)


def _port_levels_unique(w: Walker, path: str, value: Any) -> None:
    seen: set[int] = set()
    for i, item in enumerate(value):
        n = item["port"]["number"]
        if n in seen:
            w.error(f"{path}[{i}].port.number", f"Duplicate value: {n}")
        seen.add(n)


def _traffic_policy(*, port_level: bool) -> Validator:
    fields: dict[str, Validator | Unsupported] = {
        "loadBalancer": _load_balancer,
        "connectionPool": _connection_pool,
        "outlierDetection": _outlier_detection,
        "tls": _tls,
        "tunnel": Unsupported(),
        "proxyProtocol": Unsupported(),
        "retryBudget": Unsupported(),
    }
    if port_level:
        fields["portLevelSettings"] = with_checks(
            list_of(_port_policy, max_items=256), _port_levels_unique
        )
    return obj(fields)


traffic_policy = _traffic_policy(port_level=True)

_subset = obj(
    {
        "name": string(min_len=1, check=dns1123_label),
        "labels": labels,
        "trafficPolicy": traffic_policy,
    },
    required=["name"],
)

spec: Validator = obj(
    {
        "host": string(min_len=1, check=hostname),
        "trafficPolicy": traffic_policy,
        "subsets": with_checks(list_of(_subset, max_items=256), unique("name")),
        "exportTo": export_to,
        "workloadSelector": Unsupported(),
    },
    required=["host"],
)
