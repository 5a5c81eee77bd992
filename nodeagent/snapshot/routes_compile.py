"""Compile a VirtualService spec (decoded from the store) into `routes.HttpRoute`/`TcpRoute`.

Runs once per document when the snapshot converts it. The input is whatever the store holds, so
every read checks its type; the first problem raises RouteError with the field path
(`spec.http[0].match[1].uri.regex`), and the snapshot leaves that one VirtualService out.
Istio's defaults are applied here (a lone destination takes weight 100, retries default to
Istio's policy, a missing percentage is 100%, `0s` timeouts mean none) so the per-request
decision has nothing left to interpret.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from typing import Any

from nodeagent.config.duration import DurationError, parse_duration
from nodeagent.config.regex import RegexError, compile_regex
from nodeagent.config.validate.virtualservice import GRPC_STATUS_NAMES
from nodeagent.snapshot import hosts
from nodeagent.snapshot.model import freeze
from nodeagent.snapshot.routes import (
    DEFAULT_RETRIES,
    NO_RETRIES,
    PRESENT,
    Destination,
    DirectResponse,
    FaultRule,
    HeaderOps,
    Headers,
    HttpMatch,
    HttpRoute,
    Mirror,
    RedirectRule,
    RetryPolicy,
    Rewrite,
    StringMatch,
    TcpMatch,
    TcpRoute,
)


class RouteError(ValueError):
    """A VirtualService field that does not compile: where (`path`) and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Scope:
    """What compiling one VirtualService needs to know about where it lives."""

    def __init__(self, namespace: str, name: str, cluster_domain: str) -> None:
        self.namespace = namespace
        self.ref = f"{namespace}/{name}"
        self.cluster_domain = cluster_domain


def compile_routes(
    spec: Mapping[str, Any], *, namespace: str, name: str, cluster_domain: str
) -> tuple[tuple[HttpRoute, ...], tuple[TcpRoute, ...], tuple[TcpRoute, ...]]:
    """The `http`, `tcp` and `tls` routes of one VirtualService spec; RouteError on the first
    bad field. A `tls` route is a `TcpRoute` whose matches carry `sni_hosts`."""
    scope = _Scope(namespace, name, cluster_domain)
    http = tuple(
        _http_route(scope, f"spec.http[{i}]", _map(f"spec.http[{i}]", r), i)
        for i, r in enumerate(_seq("spec.http", spec.get("http")))
    )
    tcp = tuple(
        _tcp_route(scope, f"spec.tcp[{i}]", _map(f"spec.tcp[{i}]", r), i)
        for i, r in enumerate(_seq("spec.tcp", spec.get("tcp")))
    )
    tls = tuple(
        _tcp_route(scope, f"spec.tls[{i}]", _map(f"spec.tls[{i}]", r), i, tls=True)
        for i, r in enumerate(_seq("spec.tls", spec.get("tls")))
    )
    return http, tcp, tls


# -- typed reads ------------------------------------------------------------------------------


def _map(path: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RouteError(path, f"must be a map, not {type(value).__name__}")
    return value


def _seq(path: str, value: Any) -> list[Any] | tuple[Any, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise RouteError(path, f"must be a list, not {type(value).__name__}")
    return value


def _text(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RouteError(path, f"must be a string, not {type(value).__name__}")
    return value


def _opt_text(path: str, value: Any) -> str | None:
    return None if value is None else _text(path, value)


def _int(path: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RouteError(path, f"{value!r} is not an integer in [{low}, {high}]")
    return value


def _percent(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise RouteError(path, f"{value!r} is not a percentage in [0, 100]")
    return float(value)


def _seconds(path: str, value: Any) -> float | None:
    """A duration in seconds; absent and `0s` are None (Istio's "no timeout")."""
    if value is None:
        return None
    try:
        ns = parse_duration(value)
    except DurationError as exc:
        raise RouteError(path, str(exc)) from None
    return ns / 1e9 if ns > 0 else None


def _percentage(path: str, doc: Mapping[str, Any], old_key: str = "percent") -> float:
    """`percentage.value` or the older integer `percent`; neither given means 100%."""
    if (p := doc.get("percentage")) is not None:
        return _percent(f"{path}.percentage.value", _map(f"{path}.percentage", p).get("value", 0))
    if (old := doc.get(old_key)) is not None:
        return _percent(f"{path}.{old_key}", old)
    return 100.0


def _labels(path: str, value: Any) -> Mapping[str, str] | None:
    doc = _map(path, value)
    for k, v in doc.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise RouteError(path, f"label {k!r}: {v!r} is not a string pair")
    return freeze(dict(doc)) if doc else None


def _gateways(scope: _Scope, path: str, value: Any) -> frozenset[str] | None:
    refs = frozenset(
        hosts.gateway_ref(_text(f"{path}[{i}]", g), scope.namespace)
        for i, g in enumerate(_seq(path, value))
    )
    return refs or None


# -- matches ----------------------------------------------------------------------------------


def string_match(path: str, value: Any, *, ignore_case: bool = False) -> StringMatch:
    """An Istio StringMatch; exact beats prefix beats regex, none of them is "present".
    `ignore_case` (a uri's `ignoreUriCase`) folds exact and prefix only: Envoy's
    `case_sensitive` does not apply to regex matches, so neither does Istio's flag."""
    doc = _map(path, value)
    if (exact := doc.get("exact")) is not None:
        text = _text(f"{path}.exact", exact)
        return StringMatch("exact", text.lower() if ignore_case else text, ignore_case)
    if (prefix := doc.get("prefix")) is not None:
        text = _text(f"{path}.prefix", prefix)
        return StringMatch("prefix", text.lower() if ignore_case else text, ignore_case)
    if (regex := doc.get("regex")) is not None:
        return _regex(f"{path}.regex", regex)
    return PRESENT


def _regex(path: str, value: Any) -> StringMatch:
    pattern = _text(path, value)
    try:
        compiled = compile_regex(pattern)
    except RegexError as exc:
        raise RouteError(path, str(exc)) from None
    return StringMatch("regex", pattern, False, compiled)


def _named_matches(
    path: str, value: Any, *, lower: bool, keep_pseudo: bool = False
) -> tuple[tuple[str, StringMatch], ...]:
    out = []
    for name, m in _map(path, value).items():
        key = _text(path, name)
        if lower and not (keep_pseudo and key.startswith(":")):
            key = key.lower()
        out.append((key, string_match(f"{path}[{name}]", m)))
    return tuple(out)


def _http_match(scope: _Scope, path: str, doc: Mapping[str, Any]) -> HttpMatch:
    ignore_case = doc.get("ignoreUriCase")
    if ignore_case is not None and not isinstance(ignore_case, bool):
        raise RouteError(f"{path}.ignoreUriCase", f"{ignore_case!r} is not a boolean")

    def opt(key: str, fold: bool = False) -> StringMatch | None:
        m = doc.get(key)
        return None if m is None else string_match(f"{path}.{key}", m, ignore_case=fold)

    port = doc.get("port")
    return HttpMatch(
        name=_opt_text(f"{path}.name", doc.get("name")),
        uri=opt("uri", bool(ignore_case)),
        scheme=opt("scheme"),
        method=opt("method"),
        authority=opt("authority"),
        headers=_named_matches(f"{path}.headers", doc.get("headers"), lower=True, keep_pseudo=True),
        without_headers=_named_matches(
            f"{path}.withoutHeaders", doc.get("withoutHeaders"), lower=True
        ),
        query_params=_named_matches(f"{path}.queryParams", doc.get("queryParams"), lower=False),
        port=None if port is None else _int(f"{path}.port", port, 1, 65535),
        source_labels=_labels(f"{path}.sourceLabels", doc.get("sourceLabels")),
        source_namespace=_opt_text(f"{path}.sourceNamespace", doc.get("sourceNamespace")),
        gateways=_gateways(scope, f"{path}.gateways", doc.get("gateways")),
    )


def _tcp_match(scope: _Scope, path: str, doc: Mapping[str, Any], *, tls: bool) -> TcpMatch:
    subnets = []
    for i, s in enumerate(_seq(f"{path}.destinationSubnets", doc.get("destinationSubnets"))):
        text = _text(f"{path}.destinationSubnets[{i}]", s)
        try:
            subnets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise RouteError(f"{path}.destinationSubnets[{i}]", f"{text!r} is not a CIDR") from None
    port = doc.get("port")
    return TcpMatch(
        port=None if port is None else _int(f"{path}.port", port, 1, 65535),
        destination_subnets=tuple(subnets),
        source_labels=_labels(f"{path}.sourceLabels", doc.get("sourceLabels")),
        source_namespace=_opt_text(f"{path}.sourceNamespace", doc.get("sourceNamespace")),
        gateways=_gateways(scope, f"{path}.gateways", doc.get("gateways")),
        sni_hosts=tuple(
            _text(f"{path}.sniHosts[{i}]", h).lower().rstrip(".")
            for i, h in enumerate(_seq(f"{path}.sniHosts", doc.get("sniHosts")) if tls else ())
        ),
    )


# -- actions ----------------------------------------------------------------------------------


def _header_ops(path: str, value: Any) -> HeaderOps:
    doc = _map(path, value)
    if not doc:
        return HeaderOps()

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        return tuple((str(k), str(v)) for k, v in _map(f"{path}.{key}", doc.get(key)).items())

    remove = tuple(str(n) for n in _seq(f"{path}.remove", doc.get("remove")))
    return HeaderOps(set=pairs("set"), add=pairs("add"), remove=remove)


def _headers(path: str, value: Any) -> Headers:
    doc = _map(path, value)
    if not doc:
        return Headers()
    return Headers(
        request=_header_ops(f"{path}.request", doc.get("request")),
        response=_header_ops(f"{path}.response", doc.get("response")),
    )


def _destination(
    scope: _Scope, path: str, value: Any, *, weight: int = 100, headers: Any = None
) -> Destination:
    doc = _map(path, value)
    host = _text(f"{path}.host", doc.get("host"))
    port = _map(f"{path}.port", doc.get("port")).get("number")
    subset = _opt_text(f"{path}.subset", doc.get("subset"))
    return Destination(
        host=host,
        fqdn=hosts.qualify(host, scope.namespace, scope.cluster_domain),
        subset=subset or None,
        port=None if port is None else _int(f"{path}.port.number", port, 1, 65535),
        weight=weight,
        headers=_headers(f"{path}.headers", headers),
    )


def _weighted(
    scope: _Scope, path: str, value: Any, *, with_headers: bool
) -> tuple[Destination, ...]:
    routes = _seq(path, value)
    out = []
    for i, r in enumerate(routes):
        entry = _map(f"{path}[{i}]", r)
        weight = entry.get("weight")
        # Istio: a lone destination without weight takes everything; others default to 0.
        if not weight:
            weight = 100 if len(routes) == 1 else 0
        out.append(
            _destination(
                scope,
                f"{path}[{i}].destination",
                entry.get("destination"),
                weight=_int(f"{path}[{i}].weight", weight, 0, 100),
                headers=entry.get("headers") if with_headers else None,
            )
        )
    return tuple(out)


def _retries(path: str, value: Any) -> RetryPolicy:
    if value is None:
        return DEFAULT_RETRIES
    doc = _map(path, value)
    attempts = _int(f"{path}.attempts", doc.get("attempts", DEFAULT_RETRIES.attempts), 0, 1000)
    if attempts == 0:
        return NO_RETRIES
    retry_on = set(DEFAULT_RETRIES.retry_on)
    codes: set[int] = set()
    if (text := doc.get("retryOn")) is not None:
        retry_on = set()
        for part in _text(f"{path}.retryOn", text).split(","):
            part = part.strip()
            if part.isdigit():
                codes.add(int(part))
                retry_on.add("retriable-status-codes")
            elif part:
                retry_on.add(part)
    return RetryPolicy(
        attempts=attempts,
        per_try_timeout=_seconds(f"{path}.perTryTimeout", doc.get("perTryTimeout")),
        retry_on=frozenset(retry_on),
        status_codes=frozenset(codes) if codes else DEFAULT_RETRIES.status_codes,
    )


def _fault(path: str, value: Any) -> FaultRule | None:
    doc = _map(path, value)
    if not doc:
        return None
    delay: float | None = None
    delay_percent = abort_percent = 100.0
    abort: int | None = None
    abort_grpc: int | None = None
    if (d := doc.get("delay")) is not None:
        d = _map(f"{path}.delay", d)
        delay = _seconds(f"{path}.delay.fixedDelay", d.get("fixedDelay")) or 0.0
        delay_percent = _percentage(f"{path}.delay", d)
    if (a := doc.get("abort")) is not None:
        a = _map(f"{path}.abort", a)
        if a.get("grpcStatus") is not None:
            abort_grpc = _grpc_status(f"{path}.abort.grpcStatus", a["grpcStatus"])
        else:
            abort = _int(f"{path}.abort.httpStatus", a.get("httpStatus"), 200, 599)
        abort_percent = _percentage(f"{path}.abort", a)
    return FaultRule(delay, delay_percent, abort, abort_percent, abort_grpc)


def _grpc_status(path: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 16:
        return value
    if isinstance(value, str) and value.upper() in GRPC_STATUS_NAMES:
        return GRPC_STATUS_NAMES.index(value.upper())
    raise RouteError(path, f"not a gRPC status: {value!r}")


def _rewrite(path: str, value: Any) -> Rewrite | None:
    doc = _map(path, value)
    if not doc:
        return None
    uri_regex = None
    replacement = ""
    if (rr := doc.get("uriRegexRewrite")) is not None:
        rr = _map(f"{path}.uriRegexRewrite", rr)
        uri_regex = _regex(f"{path}.uriRegexRewrite.match", rr.get("match"))
        replacement = _text(f"{path}.uriRegexRewrite.rewrite", rr.get("rewrite", ""))
    return Rewrite(
        uri=_opt_text(f"{path}.uri", doc.get("uri")),
        authority=_opt_text(f"{path}.authority", doc.get("authority")) or None,
        uri_regex=uri_regex,
        uri_regex_rewrite=replacement,
    )


def _redirect(path: str, value: Any) -> RedirectRule:
    doc = _map(path, value)
    port = doc.get("port")
    return RedirectRule(
        status=_int(f"{path}.redirectCode", doc.get("redirectCode", 301), 300, 399),
        scheme=_opt_text(f"{path}.scheme", doc.get("scheme")) or None,
        authority=_opt_text(f"{path}.authority", doc.get("authority")) or None,
        port=None if port is None else _int(f"{path}.port", port, 1, 65535),
        port_from_request=doc.get("derivePort") == "FROM_REQUEST_PORT",
        uri=_opt_text(f"{path}.uri", doc.get("uri")),
    )


def _direct_response(path: str, value: Any) -> DirectResponse:
    doc = _map(path, value)
    body = _map(f"{path}.body", doc.get("body"))
    data = b""
    if (s := body.get("string")) is not None:
        data = _text(f"{path}.body.string", s).encode()
    elif (b := body.get("bytes")) is not None:
        try:
            data = base64.b64decode(_text(f"{path}.body.bytes", b), validate=True)
        except (binascii.Error, ValueError):
            raise RouteError(f"{path}.body.bytes", "not valid base64") from None
    return DirectResponse(status=_int(f"{path}.status", doc.get("status"), 200, 599), body=data)


def _mirror(scope: _Scope, path: str, doc: Mapping[str, Any]) -> Mirror | None:
    if (m := doc.get("mirror")) is None:
        return None
    if (pct := doc.get("mirrorPercentage")) is not None:
        value = _map(f"{path}.mirrorPercentage", pct).get("value", 0)
        percent = _percent(f"{path}.mirrorPercentage.value", value)
    else:
        percent = _percent(f"{path}.mirrorPercent", doc.get("mirrorPercent", 100))
    return Mirror(_destination(scope, f"{path}.mirror", m), percent)


def _route_name(scope: _Scope, name: str | None, index: int) -> str:
    return f"{scope.ref}.{name or index}"


def _http_route(scope: _Scope, path: str, doc: Mapping[str, Any], index: int) -> HttpRoute:
    matches = tuple(
        _http_match(scope, f"{path}.match[{i}]", _map(f"{path}.match[{i}]", m))
        for i, m in enumerate(_seq(f"{path}.match", doc.get("match")))
    )
    redirect = doc.get("redirect")
    direct = doc.get("directResponse")
    name = _opt_text(f"{path}.name", doc.get("name"))
    return HttpRoute(
        route_name=_route_name(scope, name, index),
        name=name,
        matches=matches,
        destinations=_weighted(scope, f"{path}.route", doc.get("route"), with_headers=True),
        redirect=None if redirect is None else _redirect(f"{path}.redirect", redirect),
        direct_response=None
        if direct is None or redirect is not None
        else _direct_response(f"{path}.directResponse", direct),
        headers=_headers(f"{path}.headers", doc.get("headers")),
        rewrite=_rewrite(f"{path}.rewrite", doc.get("rewrite")),
        timeout=_seconds(f"{path}.timeout", doc.get("timeout")),
        retries=_retries(f"{path}.retries", doc.get("retries")),
        retries_configured=doc.get("retries") is not None,
        fault=_fault(f"{path}.fault", doc.get("fault")),
        mirror=_mirror(scope, path, doc),
    )


def _tcp_route(
    scope: _Scope, path: str, doc: Mapping[str, Any], index: int, *, tls: bool = False
) -> TcpRoute:
    matches = tuple(
        _tcp_match(scope, f"{path}.match[{i}]", _map(f"{path}.match[{i}]", m), tls=tls)
        for i, m in enumerate(_seq(f"{path}.match", doc.get("match")))
    )
    name = _opt_text(f"{path}.name", doc.get("name"))
    return TcpRoute(
        route_name=_route_name(scope, name, index),
        matches=matches,
        destinations=_weighted(scope, f"{path}.route", doc.get("route"), with_headers=False),
    )
