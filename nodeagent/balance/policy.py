"""A DestinationRule's trafficPolicy, resolved for one (subset, port) into frozen dataclasses.

The snapshot keeps DestinationRules in Istio's shape (frozen mappings); this module applies
Istio's precedence (`MergeTrafficPolicy`) and Envoy's defaults once, when a picker is built, so
the hot path never looks at a mapping:

1. the top-level policy;
2. its `portLevelSettings` entry for the port *replaces* loadBalancer, connectionPool,
   outlierDetection and tls together (a port-level policy does not inherit: a field it omits
   gets the default);
3. the subset's policy overrides each of those four fields it sets;
4. the subset's own `portLevelSettings` entry for the port replaces all four again.

Defaults differ from Istio in one place on purpose: with no loadBalancer, the balancer is
peak-EWMA with power of two choices (Linkerd's) rather than LEAST_REQUEST.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nodeagent.balance.errors import PolicyError
from nodeagent.config.duration import DurationError, parse_duration
from nodeagent.snapshot.model import DestinationRule

BalancerKind = Literal[
    "PEAK_EWMA", "ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH", "RING_HASH", "MAGLEV"
]
HashSource = Literal["header", "cookie", "source_ip", "query"]

UNLIMITED = 2**32 - 1  # Istio's "no limit" for connection pool counters
DEFAULT_RING_SIZE = 1024  # Envoy's minimum_ring_size default
DEFAULT_MAGLEV_SIZE = 65537  # Envoy's maglev table_size default (a prime)
DEFAULT_PANIC_PERCENT = 50.0  # Envoy's healthy_panic_threshold default


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """Where the hash key comes from, and which table maps it to an endpoint."""

    source: HashSource
    name: str = ""  # header (lower-cased), cookie or query parameter name; "" for source_ip
    algorithm: Literal["RING_HASH", "MAGLEV"] = "RING_HASH"
    ring_size: int = DEFAULT_RING_SIZE
    table_size: int = DEFAULT_MAGLEV_SIZE
    cookie_path: str | None = None
    cookie_ttl_s: float | None = None  # set: the HTTP engine may generate the cookie


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    kind: BalancerKind = "PEAK_EWMA"
    hash: ConsistentHash | None = None
    warmup_s: float = 0.0  # parsed for completeness; slow start is not implemented


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Envoy's consecutive-error detectors as Istio configures them (0 disables one)."""

    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    interval_s: float = 10.0
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0  # Envoy's max_ejection_time default; not settable in Istio
    max_ejection_percent: float = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """Circuit-breaker limits and timeouts (Istio's defaults: unlimited, 10 s connect)."""

    max_connections: int = UNLIMITED
    connect_timeout_s: float = 10.0
    tcp_idle_timeout_s: float = 3600.0
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED  # http2MaxRequests: active requests on the cluster
    max_requests_per_connection: int = 0  # 0: unlimited
    max_concurrent_streams: int = 0  # http.maxConcurrentStreams per HTTP/2 upstream; 0: default
    max_retries: int = UNLIMITED
    http_idle_timeout_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """`trafficPolicy.tls` with mode SIMPLE or MUTUAL: the proxy originates TLS to the endpoint
    (docs/gateway.md, TLS origination). `ca_certificates` None: the system trust store."""

    mode: Literal["SIMPLE", "MUTUAL"]
    ca_certificates: str | None = None
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    insecure_skip_verify: bool = False
    client_certificate: str | None = None
    private_key: str | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer = field(default_factory=LoadBalancer)
    outlier: OutlierDetection | None = None  # None: no outlier detection
    pool: ConnectionPool = field(default_factory=ConnectionPool)
    # Percentage of healthy endpoints under which every endpoint is picked (0: never).
    panic_percent: float = DEFAULT_PANIC_PERCENT
    tls: UpstreamTls | None = None  # None: no TLS origination (DISABLE, ISTIO_MUTUAL, unset)


DEFAULT_POLICY = TrafficPolicy()

_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")


def resolve(dr: DestinationRule | None, subset: str | None, port: int | None) -> TrafficPolicy:
    """The effective policy for traffic to `port` of the rule's host, in `subset` (or none).

    Raises PolicyError naming the field path when a value cannot be used.
    """
    if dr is None:
        return DEFAULT_POLICY
    merged: dict[str, Any] = {}
    top = dr.traffic_policy
    path = dict.fromkeys(_FIELDS, "trafficPolicy")
    if top:
        for k in _FIELDS:
            if top.get(k) is not None:
                merged[k] = top[k]
        _apply_port_level(top, port, merged, path, "trafficPolicy")
    if subset is not None:
        s = dr.subset(subset)
        sp = s.traffic_policy if s is not None else None
        if sp:
            where = f"subsets[{subset}].trafficPolicy"
            for k in _FIELDS:
                if sp.get(k) is not None:
                    merged[k] = sp[k]
                    path[k] = where
            _apply_port_level(sp, port, merged, path, where)
    return _build(merged, path)


def _apply_port_level(
    policy: Mapping[str, Any],
    port: int | None,
    merged: dict[str, Any],
    path: dict[str, str],
    where: str,
) -> None:
    if port is None:
        return
    for i, entry in enumerate(policy.get("portLevelSettings") or ()):
        number = (entry.get("port") or {}).get("number")
        if number == port:
            # Istio: port-level policies do not inherit; unset fields fall back to defaults.
            for k in _FIELDS:
                merged.pop(k, None)
                if entry.get(k) is not None:
                    merged[k] = entry[k]
                path[k] = f"{where}.portLevelSettings[{i}]"
            return


def _build(merged: Mapping[str, Any], path: Mapping[str, str]) -> TrafficPolicy:
    lb = _load_balancer(merged.get("loadBalancer"), f"{path['loadBalancer']}.loadBalancer")
    od_doc = merged.get("outlierDetection")
    od_path = f"{path['outlierDetection']}.outlierDetection"
    outlier = _outlier(od_doc, od_path) if od_doc is not None else None
    panic = DEFAULT_PANIC_PERCENT
    if od_doc is not None and od_doc.get("minHealthPercent") is not None:
        panic = float(_int(od_doc["minHealthPercent"], f"{od_path}.minHealthPercent", 100))
    pool = _pool(merged.get("connectionPool"), f"{path['connectionPool']}.connectionPool")
    tls = _tls(merged.get("tls"), f"{path['tls']}.tls")
    return TrafficPolicy(load_balancer=lb, outlier=outlier, pool=pool, panic_percent=panic, tls=tls)


def _tls(doc: Any, path: str) -> UpstreamTls | None:
    if doc is None:
        return None
    doc = _mapping(doc, path)
    mode = doc.get("mode", "DISABLE")
    if mode in ("DISABLE", "ISTIO_MUTUAL"):
        return None  # the mesh's own mTLS (HBONE) already protects meshed endpoints
    if mode not in ("SIMPLE", "MUTUAL"):
        raise PolicyError(f"{path}.mode", f"TLS mode {mode!r} is not supported")

    def text(key: str) -> str | None:
        value = doc.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise PolicyError(f"{path}.{key}", "must be a non-empty string")
        return value

    client, key = text("clientCertificate"), text("privateKey")
    if mode == "MUTUAL" and (client is None or key is None):
        raise PolicyError(path, "MUTUAL needs clientCertificate and privateKey")
    sans = doc.get("subjectAltNames") or ()
    return UpstreamTls(
        mode=mode,
        ca_certificates=text("caCertificates"),
        sni=text("sni"),
        subject_alt_names=tuple(str(x) for x in sans),
        insecure_skip_verify=bool(doc.get("insecureSkipVerify", False)),
        client_certificate=client,
        private_key=key,
    )


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(path, f"must be a mapping, not {type(value).__name__}")
    return value


def _int(value: Any, path: str, maximum: int = UNLIMITED) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(path, f"must be an integer, not {value!r}")
    if not 0 <= value <= maximum:
        raise PolicyError(path, f"must be between 0 and {maximum}, not {value}")
    return value


def _seconds(value: Any, path: str) -> float:
    try:
        return parse_duration(value) / 1e9
    except DurationError as e:
        raise PolicyError(path, str(e)) from None


_SIMPLE: dict[str, BalancerKind] = {
    "UNSPECIFIED": "PEAK_EWMA",
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",  # deprecated alias in Istio
    "RANDOM": "RANDOM",
    "PASSTHROUGH": "PASSTHROUGH",
}


def _load_balancer(doc: Any, path: str) -> LoadBalancer:
    if doc is None:
        return LoadBalancer()
    doc = _mapping(doc, path)
    warmup = 0.0
    if doc.get("warmupDurationSecs") is not None:
        warmup = _seconds(doc["warmupDurationSecs"], f"{path}.warmupDurationSecs")
    elif doc.get("warmup") is not None:
        w = _mapping(doc["warmup"], f"{path}.warmup")
        warmup = _seconds(w.get("duration"), f"{path}.warmup.duration")
    if doc.get("consistentHash") is not None:
        ch = _consistent_hash(doc["consistentHash"], f"{path}.consistentHash")
        return LoadBalancer(kind=ch.algorithm, hash=ch, warmup_s=warmup)
    simple = doc.get("simple", "UNSPECIFIED")
    kind = _SIMPLE.get(simple) if isinstance(simple, str) else None
    if kind is None:
        raise PolicyError(f"{path}.simple", f"unknown load balancer {simple!r}")
    return LoadBalancer(kind=kind, warmup_s=warmup)


def _consistent_hash(doc: Any, path: str) -> ConsistentHash:
    doc = _mapping(doc, path)
    source: HashSource
    cookie_path: str | None = None
    cookie_ttl: float | None = None
    if doc.get("httpHeaderName"):
        source, name = "header", str(doc["httpHeaderName"]).lower()
    elif doc.get("httpCookie") is not None:
        cookie = _mapping(doc["httpCookie"], f"{path}.httpCookie")
        name = cookie.get("name") or ""
        if not isinstance(name, str) or not name:
            raise PolicyError(f"{path}.httpCookie.name", "a cookie name is required")
        source = "cookie"
        cookie_path = cookie.get("path") or None
        if cookie.get("ttl") is not None:
            cookie_ttl = _seconds(cookie["ttl"], f"{path}.httpCookie.ttl")
    elif doc.get("useSourceIp"):
        source, name = "source_ip", ""
    elif doc.get("httpQueryParameterName"):
        source, name = "query", str(doc["httpQueryParameterName"])
    else:
        raise PolicyError(
            path,
            "needs one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
        )
    if doc.get("maglev") is not None:
        m = _mapping(doc["maglev"], f"{path}.maglev")
        size = DEFAULT_MAGLEV_SIZE
        if m.get("tableSize") is not None:
            size = _int(m["tableSize"], f"{path}.maglev.tableSize", 5_000_011)
            if size < 2:
                raise PolicyError(f"{path}.maglev.tableSize", f"{size} is too small")
        return ConsistentHash(
            source,
            name,
            "MAGLEV",
            table_size=size,
            cookie_path=cookie_path,
            cookie_ttl_s=cookie_ttl,
        )
    ring = DEFAULT_RING_SIZE
    if doc.get("minimumRingSize") is not None:  # deprecated top-level spelling
        ring = _int(doc["minimumRingSize"], f"{path}.minimumRingSize", 8_388_608)
    if doc.get("ringHash") is not None:
        r = _mapping(doc["ringHash"], f"{path}.ringHash")
        if r.get("minimumRingSize") is not None:
            ring = _int(r["minimumRingSize"], f"{path}.ringHash.minimumRingSize", 8_388_608)
    return ConsistentHash(
        source,
        name,
        "RING_HASH",
        ring_size=max(ring, 1),
        cookie_path=cookie_path,
        cookie_ttl_s=cookie_ttl,
    )


def _outlier(doc: Any, path: str) -> OutlierDetection:
    doc = _mapping(doc, path)
    d = OutlierDetection()
    c5xx, cgw = d.consecutive_5xx, d.consecutive_gateway
    if doc.get("consecutiveErrors") is not None:
        # Deprecated: Istio maps it to gateway errors only (istio/api#617).
        cgw = _int(doc["consecutiveErrors"], f"{path}.consecutiveErrors")
        c5xx = 0
    if doc.get("consecutiveGatewayErrors") is not None:
        cgw = _int(doc["consecutiveGatewayErrors"], f"{path}.consecutiveGatewayErrors")
    if doc.get("consecutive5xxErrors") is not None:
        c5xx = _int(doc["consecutive5xxErrors"], f"{path}.consecutive5xxErrors")
    interval = d.interval_s
    if doc.get("interval") is not None:
        interval = _seconds(doc["interval"], f"{path}.interval")
        if interval <= 0:
            raise PolicyError(f"{path}.interval", "must be greater than 0")
    base = d.base_ejection_s
    if doc.get("baseEjectionTime") is not None:
        base = _seconds(doc["baseEjectionTime"], f"{path}.baseEjectionTime")
    max_pct = d.max_ejection_percent
    if doc.get("maxEjectionPercent") is not None:
        max_pct = float(_int(doc["maxEjectionPercent"], f"{path}.maxEjectionPercent", 100))
    return OutlierDetection(
        consecutive_5xx=c5xx,
        consecutive_gateway=cgw,
        interval_s=interval,
        base_ejection_s=base,
        max_ejection_s=max(d.max_ejection_s, base),
        max_ejection_percent=max_pct,
    )


def _pool(doc: Any, path: str) -> ConnectionPool:
    if doc is None:
        return ConnectionPool()
    doc = _mapping(doc, path)
    d = ConnectionPool()
    values: dict[str, Any] = {}
    tcp = doc.get("tcp")
    if tcp is not None:
        tcp = _mapping(tcp, f"{path}.tcp")
        if tcp.get("maxConnections") is not None:
            values["max_connections"] = _int(tcp["maxConnections"], f"{path}.tcp.maxConnections")
        if tcp.get("connectTimeout") is not None:
            values["connect_timeout_s"] = _seconds(
                tcp["connectTimeout"], f"{path}.tcp.connectTimeout"
            )
        if tcp.get("idleTimeout") is not None:
            values["tcp_idle_timeout_s"] = _seconds(tcp["idleTimeout"], f"{path}.tcp.idleTimeout")
    http = doc.get("http")
    if http is not None:
        http = _mapping(http, f"{path}.http")
        for src, dst in (
            ("http1MaxPendingRequests", "max_pending_requests"),
            ("http2MaxRequests", "max_requests"),
            ("maxRequestsPerConnection", "max_requests_per_connection"),
            ("maxRetries", "max_retries"),
            ("maxConcurrentStreams", "max_concurrent_streams"),
        ):
            if http.get(src) is not None:
                values[dst] = _int(http[src], f"{path}.http.{src}")
        if http.get("idleTimeout") is not None:
            values["http_idle_timeout_s"] = _seconds(
                http["idleTimeout"], f"{path}.http.idleTimeout"
            )
    # Istio treats 0 as "unset" for the counters (proto3 default): keep Envoy's defaults.
    for k in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
        if values.get(k) == 0:
            values[k] = getattr(d, k)
    return ConnectionPool(**values)
