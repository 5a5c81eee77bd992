"""VirtualServices are compiled once, when the snapshot converts them: typed routes with
durations in seconds, Istio's defaults applied, regexes compiled by RE2; a VirtualService that
does not compile is left out alone, named in the log, and the rest of the snapshot builds."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from nodeagent.snapshot import SnapshotBuilder
from nodeagent.snapshot.routes import DEFAULT_RETRIES, NO_RETRIES
from nodeagent.snapshot.routes_compile import RouteError, compile_routes
from nodeagent.store import codec, keys
from nodeagent.store.base import KeyValue


def _compile(
    http: list[dict[str, Any]] | None = None, tcp: list[dict[str, Any]] | None = None
) -> Any:
    spec: dict[str, Any] = {"hosts": ["a"]}
    if http is not None:
        spec["http"] = http
    if tcp is not None:
        spec["tcp"] = tcp
    http_routes, tcp_routes, _ = compile_routes(
        spec, namespace="web", name="vs", cluster_domain="cluster.local"
    )
    return http_routes, tcp_routes


DEST = [{"destination": {"host": "a"}}]


def test_an_http_route_compiles_to_typed_fields() -> None:
    (route,), () = _compile(
        [
            {
                "name": "canary",
                "match": [{"uri": {"regex": "/v[0-9]+/.*"}, "ignoreUriCase": True}],
                "route": [
                    {"destination": {"host": "a", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "b.other", "port": {"number": 9080}}, "weight": 10},
                ],
                "timeout": "1.5s",
                "retries": {"attempts": 3, "perTryTimeout": "250ms", "retryOn": "5xx,409"},
                "fault": {
                    "delay": {"fixedDelay": "7s", "percent": 10},
                    "abort": {"httpStatus": 418},
                },
                "mirror": {"host": "shadow"},
                "mirrorPercentage": {"value": 12.5},
                "headers": {"request": {"set": {"x-a": "1"}, "remove": ["x-b"]}},
                "rewrite": {"uri": "/", "authority": "new"},
            }
        ]
    )
    assert route.route_name == "web/vs.canary"
    (m,) = route.matches
    assert m.uri is not None
    assert m.uri.kind == "regex"
    assert not m.uri.ignore_case  # ignoreUriCase folds exact and prefix only, as Envoy does
    assert m.uri.regex is not None
    assert m.uri.regex.fullmatch("/v2/x") is not None
    assert m.uri.regex.fullmatch("/V2/x") is None
    assert [(d.fqdn, d.subset, d.port, d.weight) for d in route.destinations] == [
        ("a.web.svc.cluster.local", "v1", None, 90),
        ("b.other", None, 9080, 10),  # dotted: resolved per request
    ]
    assert route.timeout == 1.5
    assert route.retries.attempts == 3
    assert route.retries.per_try_timeout == 0.25
    assert route.retries.retry_on == {"5xx", "retriable-status-codes"}
    assert route.retries.status_codes == {409}
    assert route.retries_configured
    assert route.fault is not None
    assert (route.fault.delay, route.fault.delay_percent) == (7.0, 10.0)
    assert (route.fault.abort_status, route.fault.abort_percent) == (418, 100.0)
    assert route.mirror is not None
    assert (route.mirror.destination.fqdn, route.mirror.percent) == (
        "shadow.web.svc.cluster.local",
        12.5,
    )
    assert route.headers.request.set == (("x-a", "1"),)
    assert route.headers.request.remove == ("x-b",)
    assert route.rewrite is not None
    assert (route.rewrite.uri, route.rewrite.authority) == (
        "/",
        "new",
    )


def test_istio_defaults_are_applied_when_compiling() -> None:
    (plain, no_retry), (tcp,) = _compile(
        [{"route": DEST, "timeout": "0s"}, {"route": DEST, "retries": {"attempts": 0}}],
        [{"route": DEST}],
    )
    assert plain.route_name == "web/vs.0"
    assert plain.destinations[0].weight == 100  # a lone destination takes everything
    assert plain.timeout is None  # 0s: no timeout
    assert plain.retries == DEFAULT_RETRIES
    assert not plain.retries_configured
    assert no_retry.retries == NO_RETRIES
    assert tcp.route_name == "web/vs.0"
    assert tcp.destinations[0].weight == 100


@pytest.mark.parametrize(
    ("http", "path", "reason"),
    [
        (
            [{"match": [{"uri": {"regex": "(?=x)"}}], "route": DEST}],
            "spec.http[0].match[0].uri.regex",
            "not valid RE2",
        ),
        (
            [{"match": [{"headers": {"ua": {"regex": "a++"}}}], "route": DEST}],
            "spec.http[0].match[0].headers[ua].regex",
            "bad repetition operator",
        ),
        (
            [{"route": DEST, "rewrite": {"uriRegexRewrite": {"match": "(", "rewrite": "/"}}}],
            "spec.http[0].rewrite.uriRegexRewrite.match",
            "missing )",
        ),
        ([{"route": DEST, "timeout": "7 seconds"}], "spec.http[0].timeout", "duration"),
        (
            [{"route": DEST, "fault": {"abort": {"percent": 5}}}],
            "spec.http[0].fault.abort.httpStatus",
            "integer",
        ),
        (
            [{"route": [{"destination": {"host": 7}}]}],
            "spec.http[0].route[0].destination.host",
            "string",
        ),
        (["not a map"], "spec.http[0]", "must be a map"),
    ],
)
def test_a_field_that_does_not_compile_is_named(http: list[Any], path: str, reason: str) -> None:
    with pytest.raises(RouteError) as info:
        _compile(http)
    assert info.value.path == path
    assert reason in info.value.reason


def _vs(name: str, http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"hosts": [name], "http": http},
    }


def test_a_virtual_service_that_does_not_compile_rejects_only_itself() -> None:
    bad_key = keys.config("VirtualService", "web", "broken")
    good_key = keys.config("VirtualService", "web", "fine")
    bad = _vs("broken", [{"match": [{"uri": {"regex": "(?<=a)b"}}], "route": DEST}])
    good = _vs("fine", [{"route": DEST}])
    kvs = [
        KeyValue(k, codec.encode(d), i, i, 1)
        for i, (k, d) in enumerate([(bad_key, bad), (good_key, good)], 1)
    ]
    with capture_logs() as logs:
        builder = SnapshotBuilder.build(kvs, 2)
    snap = builder.snapshot
    assert [vs.ref for vs in snap.routes_for("fine.web.svc.cluster.local")] == ["web/fine"]
    assert snap.routes_for("broken.web.svc.cluster.local") == ()
    assert list(builder.skipped()) == [bad_key]
    assert "spec.http[0].match[0].uri.regex" in builder.skipped()[bad_key]
    (skipped,) = [e for e in logs if e["event"] == "snapshot.document_skipped"]
    assert (skipped["kind"], skipped["namespace"], skipped["name"]) == (
        "VirtualService",
        "web",
        "broken",
    )
    assert "not valid RE2" in skipped["error"]


def test_a_tls_route_compiles_to_an_l4_route_with_sni_hosts() -> None:
    spec = {
        "hosts": ["*.example.com"],
        "tls": [
            {
                "match": [{"sniHosts": ["Db.Example.com"], "port": 443}],
                "route": [{"destination": {"host": "db", "port": {"number": 5432}}}],
            }
        ],
    }
    _, _, (route,) = compile_routes(
        spec, namespace="web", name="vs", cluster_domain="cluster.local"
    )
    assert route.route_name == "web/vs.0"
    assert route.matches[0].sni_hosts == ("db.example.com",)
    assert route.matches[0].port == 443
    assert route.destinations[0].host == "db"
