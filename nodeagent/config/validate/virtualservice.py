"""VirtualService (networking.istio.io): HTTP, TCP and TLS routing with Istio's validation rules.

Supported: hosts, gateways, exportTo; http routes with match (uri, scheme, method, authority,
headers, withoutHeaders, queryParams, port, sourceLabels, sourceNamespace, gateways,
ignoreUriCase, name), route (weighted destinations with headers), redirect, directResponse,
rewrite, headers, timeout, retries, fault (delay/abort incl. grpcStatus),
mirror/mirrorPercentage; tcp routes; tls routes (sniHosts within the hosts; served by
PASSTHROUGH gateway servers).
Not supported (rejected by path): delegate, corsPolicy, mirrors, statPrefix, http2Error aborts,
exponential delays.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Validator,
    Walker,
    boolean,
    duration,
    enum,
    integer,
    ip_or_cidr,
    list_of,
    map_of,
    number,
    obj,
    port_number,
    regex,
    string,
    with_checks,
)
from nodeagent.config.validate.common import (
    dns1123_label,
    export_to,
    header_name,
    host_or_ip,
    selector_labels,
)

MAX_BODY = 64 * 1024

_RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)


def _gateway_name(value: str) -> str | None:
    if value == "mesh":
        return None
    ns, sep, name = value.rpartition("/")
    if sep and dns1123_label(ns):
        return f"Invalid value: {value!r}: gateway namespace must be a DNS-1123 label"
    if not name or not all(not dns1123_label(p) for p in name.split(".")):
        return f"Invalid value: {value!r}: gateway must be 'mesh' or '[namespace/]name'"
    return None


def _string_match_check(*, allow_empty: bool) -> Any:
    def check(w: Walker, path: str, value: Any) -> None:
        if not allow_empty and not any(value.get(k) is not None for k in value):
            w.error(path, "must have exact, prefix or regex")

    return check


def string_match(*, allow_empty: bool = False) -> Validator:
    return obj(
        {"exact": string(), "prefix": string(), "regex": regex},
        one_of=[("exact", "prefix", "regex")],
        checks=[_string_match_check(allow_empty=allow_empty)],
    )


_HEADER_MATCHES = map_of(string_match(allow_empty=True), key=header_name, max_items=64)

_percent = obj({"value": number(minimum=0, maximum=100, what="percentage must be in [0, 100]")})

destination: Validator = obj(
    {
        "host": string(min_len=1, check=host_or_ip),
        "subset": string(check=dns1123_label),
        "port": obj({"number": port_number}),
    },
    required=["host"],
)

_header_ops = obj(
    {
        "set": map_of(string(), key=header_name, max_items=64),
        "add": map_of(string(), key=header_name, max_items=64),
        "remove": list_of(string(min_len=1, check=header_name), max_items=64),
    }
)
headers: Validator = obj({"request": _header_ops, "response": _header_ops})


def _match_request(w: Walker, path: str, value: Any) -> None:
    obj(
        {
            "name": string(),
            "uri": string_match(),
            "scheme": string_match(),
            "method": string_match(),
            "authority": string_match(),
            "headers": _HEADER_MATCHES,
            "withoutHeaders": _HEADER_MATCHES,
            "queryParams": map_of(string_match(allow_empty=True), max_items=64),
            "port": port_number,
            "sourceLabels": selector_labels,
            "gateways": list_of(string(min_len=1, check=_gateway_name)),
            "ignoreUriCase": boolean,
            "sourceNamespace": string(check=dns1123_label),
            "statPrefix": Unsupported(),
        }
    )(w, path, value)
    if isinstance(value, dict):
        for key in ("headers", "withoutHeaders"):
            hdrs = value.get(key)
            if isinstance(hdrs, dict):
                for name in hdrs:
                    if isinstance(name, str) and name.lower() == "uri":
                        w.error(
                            f"{path}.{key}[{name}]", "use the uri match, not a header named uri"
                        )


def _weights(w: Walker, path: str, routes: list[Any]) -> None:
    """Istio: with more than one destination, the weights must add up to 100."""
    weights = [r.get("weight") or 0 for r in routes]
    if len(routes) == 1:
        if routes[0].get("weight") not in (None, 0, 100):
            w.error(
                f"{path}[0].weight",
                f"Invalid value: {weights[0]}: a single destination takes all traffic "
                "(omit weight or use 100)",
            )
        return
    total = sum(weights)
    if total != 100:
        w.error(path, f"weights {'+'.join(str(x) for x in weights)}={total} must sum to 100")


def _route_list(item: Validator) -> Validator:
    base = list_of(item, min_items=1, max_items=256)

    def validate(w: Walker, path: str, value: Any) -> None:
        start = w.mark()
        base(w, path, value)
        if w.clean_since(start):
            _weights(w, path, value)

    return validate


_http_route_destination = obj(
    {
        "destination": destination,
        "weight": integer(minimum=0, maximum=100, what="weight must be between 0 and 100"),
        "headers": headers,
    },
    required=["destination"],
)


def _redirect_check(w: Walker, path: str, value: Any) -> None:
    if not any(value.get(k) is not None for k in ("uri", "authority", "port", "scheme")):
        w.error(path, "redirect must specify uri, authority, scheme or port")
    if value.get("port") is not None and value.get("derivePort") is not None:
        w.error(path, "only one of port, derivePort may be set")


_redirect = obj(
    {
        "uri": string(),
        "authority": string(),
        "port": port_number,
        "derivePort": enum(["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"]),
        "scheme": enum(["http", "https"]),
        "redirectCode": integer(minimum=300, maximum=399, what="redirect code must be 3xx"),
    },
    checks=[_redirect_check],
)


def _body_bytes(w: Walker, path: str, value: Any) -> None:
    if not isinstance(value, str):
        w.error(path, "must be a base64 string")
        return
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        w.error(path, "Invalid value: not valid base64")
        return
    if len(raw) > MAX_BODY:
        w.error(path, f"body is {len(raw)} bytes, over the {MAX_BODY} byte limit")


_direct_response = obj(
    {
        "status": integer(minimum=200, maximum=599, what="status must be between 200 and 599"),
        "body": obj(
            {"string": string(max_len=MAX_BODY), "bytes": _body_bytes},
            one_of=[("string", "bytes")],
        ),
    },
    required=["status"],
)

_rewrite = obj(
    {
        "uri": string(),
        "authority": string(),
        "uriRegexRewrite": obj({"match": regex, "rewrite": string()}, required=["match"]),
    },
    one_of=[("uri", "uriRegexRewrite")],
)


def _retry_on(value: str) -> str | None:
    for part in value.split(","):
        part = part.strip()
        if part in _RETRY_ON:
            continue
        if part.isdigit() and 100 <= int(part) <= 599:
            continue
        return f'Invalid value: "{part}": unknown retryOn policy'
    return None


_retries = obj(
    {
        "attempts": integer(minimum=0, maximum=1000),
        "perTryTimeout": duration(),
        "retryOn": string(min_len=1, check=_retry_on),
        "retryRemoteLocalities": Unsupported(),
        "retryIgnorePreviousHosts": Unsupported(),
        "backoff": Unsupported(),
    }
)

_percent_int = integer(minimum=0, maximum=100, what="percent must be in [0, 100]")

_delay = obj(
    {
        "fixedDelay": duration(),
        "percentage": _percent,
        "percent": _percent_int,
        "exponentialDelay": Unsupported(),
    },
    required=["fixedDelay"],
    one_of=[("percentage", "percent")],
)


def _abort_check(w: Walker, path: str, value: Any) -> None:
    if value.get("httpStatus") is None and value.get("grpcStatus") is None:
        w.error(path, "abort must set httpStatus or grpcStatus")


# Istio's `abort.grpcStatus` names (google.rpc.Code), in code order.
GRPC_STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

_abort = obj(
    {
        "httpStatus": integer(minimum=200, maximum=599, what="httpStatus must be between 200-599"),
        "percentage": _percent,
        "grpcStatus": enum(GRPC_STATUS_NAMES),
        "http2Error": Unsupported(),
    },
    one_of=[("httpStatus", "grpcStatus")],
    checks=[_abort_check],
)


def _fault_check(w: Walker, path: str, value: Any) -> None:
    if value.get("delay") is None and value.get("abort") is None:
        w.error(path, "fault must contain at least one of delay or abort")


_fault = obj({"delay": _delay, "abort": _abort}, checks=[_fault_check])


def _http_route_check(w: Walker, path: str, value: Any) -> None:
    actions = [k for k in ("route", "redirect", "directResponse") if value.get(k) is not None]
    if not actions:
        w.error(path, "HTTP route, redirect or directResponse is required")
    elif len(actions) > 1:
        w.error(path, f"only one of route, redirect, directResponse may be set (got {actions})")
    if value.get("redirect") is not None and value.get("rewrite") is not None:
        w.error(path, "HTTP route rule cannot contain both rewrite and redirect")
    if value.get("mirrorPercentage") is not None and value.get("mirrorPercent") is not None:
        w.error(path, "only one of mirrorPercentage, mirrorPercent may be set")
    mirror_pct = value.get("mirrorPercentage") or value.get("mirrorPercent")
    if mirror_pct is not None and value.get("mirror") is None:
        w.error(path, "mirrorPercentage needs mirror")
    if value.get("directResponse") is not None:
        for k in ("rewrite", "mirror", "retries", "timeout", "fault"):
            if value.get(k) is not None:
                w.error(f"{path}.{k}", "cannot be used with directResponse")


_http_route = obj(
    {
        "name": string(),
        "match": list_of(_match_request, max_items=256),
        "route": _route_list(_http_route_destination),
        "redirect": _redirect,
        "directResponse": _direct_response,
        "rewrite": _rewrite,
        "timeout": duration(allow_zero=True),
        "retries": _retries,
        "fault": _fault,
        "mirror": destination,
        "mirrorPercentage": _percent,
        "mirrorPercent": _percent_int,
        "headers": headers,
        "delegate": Unsupported(),
        "corsPolicy": Unsupported(),
        "mirrors": Unsupported("use mirror"),
    },
    checks=[_http_route_check],
)

_l4_match = obj(
    {
        "destinationSubnets": list_of(string(check=ip_or_cidr)),
        "port": port_number,
        "sourceLabels": selector_labels,
        "gateways": list_of(string(min_len=1, check=_gateway_name)),
        "sourceNamespace": string(check=dns1123_label),
        "sourceSubnet": Unsupported(),
    }
)

_tcp_route = obj(
    {
        "match": list_of(_l4_match),
        "route": _route_list(
            obj(
                {
                    "destination": destination,
                    "weight": integer(minimum=0, maximum=100, what="weight must be in [0, 100]"),
                },
                required=["destination"],
            )
        ),
    },
    required=["route"],
)


_tls_match = obj(
    {
        "sniHosts": list_of(string(min_len=1, check=host_or_ip), min_items=1),
        "destinationSubnets": list_of(string(check=ip_or_cidr)),
        "port": port_number,
        "sourceLabels": selector_labels,
        "gateways": list_of(string(min_len=1, check=_gateway_name)),
        "sourceNamespace": string(check=dns1123_label),
        "sourceSubnet": Unsupported(),
    },
    required=["sniHosts"],
)

_tls_route = obj(
    {
        "match": list_of(_tls_match, min_items=1),
        "route": _route_list(
            obj(
                {
                    "destination": destination,
                    "weight": integer(minimum=0, maximum=100, what="weight must be in [0, 100]"),
                },
                required=["destination"],
            )
        ),
    },
    required=["match", "route"],
)


def _sni_within_hosts(w: Walker, path: str, spec: Any) -> None:
    """Istio: every sniHost must be one of the VirtualService's hosts or within a wildcard."""
    vs_hosts = [h for h in spec.get("hosts") or [] if isinstance(h, str)]
    for i, route in enumerate(spec.get("tls") or []):
        for j, match in enumerate((route or {}).get("match") or []):
            for k, sni in enumerate((match or {}).get("sniHosts") or []):
                if isinstance(sni, str) and not any(_covers(h, sni) for h in vs_hosts):
                    w.error(
                        f"{path}.tls[{i}].match[{j}].sniHosts[{k}]",
                        f"sniHost {sni} is not a compatible subset of any of the virtual "
                        "service hosts",
                    )


def _covers(pattern: str, host: str) -> bool:
    if pattern == "*" or pattern == host:
        return True
    return pattern.startswith("*.") and host.endswith(pattern[1:])


def _spec_check(w: Walker, path: str, spec: Any) -> None:
    if not spec.get("http") and not spec.get("tcp") and not spec.get("tls"):
        w.error(path, "http, tcp or tls must be provided in virtual service")
    _sni_within_hosts(w, path, spec)
    gateways = spec.get("gateways") or []
    hosts = spec.get("hosts") or []
    if "*" in hosts and (not gateways or "mesh" in gateways):
        w.error(
            f"{path}.hosts",
            "wildcard host * is not allowed for virtual services bound to the mesh",
        )


spec: Validator = obj(
    {
        "hosts": with_checks(
            list_of(string(min_len=1, check=host_or_ip), min_items=1, max_items=256),
        ),
        "gateways": list_of(string(min_len=1, check=_gateway_name), max_items=64),
        "http": list_of(_http_route, max_items=1024),
        "tcp": list_of(_tcp_route, max_items=256),
        "exportTo": export_to,
        "tls": list_of(_tls_route, max_items=256),
    },
    required=["hosts"],
    checks=[_spec_check],
)
