"""route_http()/route_tcp() against hand-made snapshots, the seed examples and Bookinfo's."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import pytest
from routing_helpers import bookinfo_base, build, corpus, service, workload

from nodeagent.routing import (
    HttpRequest,
    Source,
    TcpRequest,
    TlsRequest,
    route_http,
    route_tcp,
    route_tls,
)
from nodeagent.snapshot import Snapshot

GW = Source(gateway="default/http-gateway")
MESH = Source(namespace="default", labels={"app": "client"})


def vs(
    name: str, http: list[dict[str, Any]], *, hosts: list[str] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"hosts": hosts or [name], "http": http, **spec},
    }


def dr(host: str, **subsets: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host},
        "spec": {"host": host, "subsets": [{"name": k, "labels": v} for k, v in subsets.items()]},
    }


def req(
    target: str = "/",
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    authority: str = "my-app",
    port: int = 80,
    host: str | None = None,
) -> HttpRequest:
    return HttpRequest.from_target(method, authority, target, headers or {}, port=port, host=host)


def const(x: float) -> Any:
    return lambda: x


def my_app(*extra: dict[str, Any]) -> Snapshot:
    return build(
        service("my-app"),
        workload("10.0.0.1", {"app": "my-app", "version": "v1.0.0"}),
        workload("10.0.0.2", {"app": "my-app", "version": "v2.0.0"}),
        service("ratings", port=9080, target=9080),
        workload("10.0.0.3", {"app": "ratings", "version": "v2"}),
        *extra,
    )


# -- the seed examples -------------------------------------------------------------------------


def test_seed_canary_splits_90_10_and_rewrites_prefix() -> None:
    snap = my_app(*corpus("seed/01-canary.yaml"))
    d = route_http(snap, GW, req("/my-app/x?q=1", authority="example.com"), rand=const(0.5))
    assert d.kind == "route"
    assert d.path == "/x?q=1"
    assert d.chosen is not None
    assert d.chosen.subset == "v1"
    assert d.chosen.host == "my-app.default.svc.cluster.local"
    assert d.chosen.port == 80
    assert d.chosen.service is not None
    eps = snap.endpoints(d.chosen.service, 80, subset=d.chosen.subset_labels)
    assert [e.address for e in eps] == ["10.0.0.1"]
    v2 = route_http(snap, GW, req("/my-app"), rand=const(0.95))
    assert v2.chosen is not None
    assert v2.chosen.subset == "v2"
    assert v2.path == "/"
    rng = random.Random(7)
    counts = Counter(
        route_http(snap, GW, req("/my-app/"), rand=rng.random).chosen.subset for _ in range(10_000)
    )  # type: ignore[union-attr]
    assert 8_800 < counts["v1"] < 9_200
    assert counts["v1"] + counts["v2"] == 10_000
    # other paths, and mesh traffic (the VirtualService is bound to the gateway only): no route
    assert route_http(snap, GW, req("/other")).kind == "no_route"
    assert (
        route_http(snap, MESH, req("/my-app", host="my-app.default.svc.cluster.local")).route_name
        == "default"
    )


def test_seed_ab_user_agent_then_default_route_fixes_404() -> None:
    docs = (
        corpus("seed/01-canary.yaml")[0:1]
        + corpus("seed/01-canary.yaml")[2:]
        + corpus("seed/03-ab-user-agent.yaml")
    )
    snap = my_app(*docs)
    chrome = route_http(snap, GW, req("/my-app", headers={"user-agent": "Mozilla/5.0 Chrome/120"}))
    assert chrome.chosen is not None
    assert chrome.chosen.subset == "v1"
    firefox = route_http(
        snap, GW, req("/my-app", headers={"user-agent": "Mozilla/5.0 Firefox/121"})
    )
    assert firefox.chosen is not None
    assert firefox.chosen.subset == "v2"
    assert route_http(snap, GW, req("/my-app", headers={"user-agent": "curl/8"})).kind == "no_route"
    assert route_http(snap, GW, req("/my-app")).kind == "no_route"
    ab = corpus("seed/03-ab-user-agent.yaml")[0]
    ab["spec"]["http"].append({"route": [{"destination": {"host": "my-app", "subset": "v1"}}]})
    fixed = my_app(*docs[:-1], ab)
    d = route_http(fixed, GW, req("/my-app", headers={"user-agent": "curl/8"}))
    assert d.kind == "route"
    assert d.route_name == "default/my-app.2"
    assert d.chosen is not None
    assert d.chosen.subset == "v1"
    assert d.path == "/my-app"


def test_seed_fault_delays_every_request_7s() -> None:
    snap = my_app(*corpus("seed/02-fault-delay.yaml"), dr("ratings", v2={"version": "v2"}))
    d = route_http(snap, MESH, req("/", host="my-app.default.svc.cluster.local"), rand=const(0.999))
    assert d.fault.delay == 7.0
    assert d.fault.abort_status is None
    assert d.chosen is not None
    assert d.chosen.host == "ratings.default.svc.cluster.local"
    assert d.chosen.subset_labels == {"version": "v2"}
    assert d.chosen.port == 9080


# -- Bookinfo, as Istio's task pages describe it ----------------------------------------------


def bookinfo(file: str) -> Snapshot:
    return build(*bookinfo_base(), *corpus(f"istio/bookinfo-networking/{file}"))


def mesh_to(snap: Snapshot, app: str, headers: dict[str, str] | None = None, r: float = 0.5) -> Any:
    return route_http(
        snap,
        MESH,
        req("/", headers=headers, port=9080, host=f"{app}.default.svc.cluster.local"),
        rand=const(r),
    )


def test_bookinfo_all_v1() -> None:
    snap = bookinfo("virtual-service-all-v1.yaml")
    for app in ("productpage", "reviews", "ratings", "details"):
        d = mesh_to(snap, app)
        assert d.chosen.subset == "v1"
        assert d.chosen.subset_labels == {"version": "v1"}
        assert d.chosen.port == 9080


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("virtual-service-reviews-80-20.yaml", {"v1": 0.8, "v2": 0.2}),
        ("virtual-service-reviews-90-10.yaml", {"v1": 0.9, "v2": 0.1}),
        ("virtual-service-reviews-50-v3.yaml", {"v1": 0.5, "v3": 0.5}),
        ("virtual-service-reviews-v2-v3.yaml", {"v2": 0.5, "v3": 0.5}),
        ("virtual-service-reviews-v3.yaml", {"v3": 1.0}),
    ],
)
def test_bookinfo_reviews_weights(file: str, expected: dict[str, float]) -> None:
    snap = bookinfo(file)
    rng = random.Random(1)
    n = 4000
    counts = Counter(
        route_http(
            snap, MESH, req(port=9080, host="reviews.default.svc.cluster.local"), rand=rng.random
        ).chosen.subset
        for _ in range(n)
    )  # type: ignore[union-attr]
    assert set(counts) == set(expected)
    for subset, share in expected.items():
        assert abs(counts[subset] / n - share) < 0.03


def test_bookinfo_jason_and_test_v2() -> None:
    snap = bookinfo("virtual-service-reviews-jason-v2-v3.yaml")
    assert mesh_to(snap, "reviews", {"end-user": "jason"}).chosen.subset == "v2"
    assert mesh_to(snap, "reviews", {"end-user": "json"}).chosen.subset == "v3"
    assert mesh_to(snap, "reviews").chosen.subset == "v3"
    snap = bookinfo("virtual-service-reviews-test-v2.yaml")
    assert mesh_to(snap, "reviews", {"end-user": "jason"}).chosen.subset == "v2"
    assert mesh_to(snap, "reviews").chosen.subset == "v1"


def test_bookinfo_ratings_delay_and_abort_only_for_jason() -> None:
    delay = bookinfo("virtual-service-ratings-test-delay.yaml")
    assert mesh_to(delay, "ratings", {"end-user": "jason"}, r=0.999).fault.delay == 7.0
    assert mesh_to(delay, "ratings").fault.delay == 0.0
    abort = bookinfo("virtual-service-ratings-test-abort.yaml")
    assert mesh_to(abort, "ratings", {"end-user": "jason"}, r=0.999).fault.abort_status == 500
    assert mesh_to(abort, "ratings").fault.abort_status is None


def test_bookinfo_details_v2_and_gateway() -> None:
    assert mesh_to(bookinfo("virtual-service-details-v2.yaml"), "details").chosen.subset == "v2"
    snap = bookinfo("bookinfo-gateway.yaml")
    gw = Source(gateway="default/bookinfo-gateway")
    for path in ("/productpage", "/static/css/x.css", "/login", "/logout", "/api/v1/products/1"):
        d = route_http(snap, gw, req(path, authority="1.2.3.4:8080", port=8080))
        assert d.kind == "route", path
        assert d.chosen.host == "productpage.default.svc.cluster.local"
        assert d.chosen.port == 9080
        assert d.chosen.subset is None
    for path in ("/productpage/x", "/", "/loginx"):
        assert route_http(snap, gw, req(path, authority="h", port=8080)).kind == "no_route", path


# -- matches ------------------------------------------------------------------------------------


def route_to(subset: str, **rule: Any) -> dict[str, Any]:
    return {"route": [{"destination": {"host": "my-app", "subset": subset}}], **rule}


def match_snapshot(*rules: dict[str, Any]) -> Snapshot:
    return my_app(
        vs("my-app", [*rules, route_to("fallback")]),
        dr("my-app", a={"version": "v1.0.0"}, fallback={}),
    )


def chosen(snap: Snapshot, request: HttpRequest, source: Source = MESH) -> str | None:
    if request.host is None and source.gateway == "mesh":
        request = dataclasses.replace(request, host="my-app.default.svc.cluster.local")
    d = route_http(snap, source, request)
    return d.chosen.subset if d.chosen else None


@pytest.mark.parametrize(
    ("match", "yes", "no"),
    [
        ({"uri": {"exact": "/a"}}, req("/a?x=1"), req("/a/")),
        ({"uri": {"prefix": "/a"}}, req("/ab"), req("/b/a")),
        ({"uri": {"regex": "/a/[0-9]+"}}, req("/a/12?z"), req("/a/12x")),
        ({"uri": {"exact": "/A"}, "ignoreUriCase": True}, req("/a"), req("/b")),
        ({"uri": {"prefix": "/A"}, "ignoreUriCase": True}, req("/ab"), req("/b")),
        ({"uri": {"regex": "/a/[0-9]+"}, "ignoreUriCase": True}, req("/a/1"), req("/A/1")),
        ({"method": {"exact": "POST"}}, req(method="POST"), req(method="GET")),
        (
            {"authority": {"exact": "my-app:80"}},
            req(authority="my-app:80"),
            req(authority="my-app"),
        ),
        (
            {"headers": {"x-v": {"exact": "1"}}},
            req(headers={"x-v": "1"}),
            req(headers={"x-v": "12"}),
        ),
        (
            {"headers": {"x-v": {"prefix": "1"}}},
            req(headers={"x-v": "12"}),
            req(headers={"x-v": "21"}),
        ),
        (
            {"headers": {"x-v": {"regex": "a|b"}}},
            req(headers={"x-v": "b"}),
            req(headers={"x-v": "ab"}),
        ),
        ({"headers": {"x-v": {}}}, req(headers={"x-v": ""}), req()),
        (
            {"withoutHeaders": {"x-v": {"exact": "1"}}},
            req(headers={"x-v": "2"}),
            req(headers={"x-v": "1"}),
        ),
        ({"withoutHeaders": {"x-v": {}}}, req(), req(headers={"x-v": "1"})),
        ({"queryParams": {"k": {"exact": "v"}}}, req("/?a=1&k=v"), req("/?k=vv")),
        ({"queryParams": {"k": {"regex": "[0-9]+"}}}, req("/?k=42"), req("/?k=4a")),
        ({"queryParams": {"k": {}}}, req("/?k="), req("/?j=1")),
        ({"port": 8080}, req(port=8080), req(port=80)),
        ({"sourceNamespace": "default"}, req(), req()),  # `no` checked with another source below
    ],
)
def test_http_matches(match: dict[str, Any], yes: HttpRequest, no: HttpRequest) -> None:
    snap = match_snapshot(route_to("a", match=[match]))
    assert chosen(snap, yes) == "a"
    other = Source(namespace="other") if "sourceNamespace" in match else MESH
    assert chosen(snap, no, other) == "fallback"


def test_match_list_is_or_and_entry_is_and() -> None:
    snap = match_snapshot(
        route_to(
            "a",
            match=[
                {"uri": {"prefix": "/x"}, "method": {"exact": "GET"}},
                {"headers": {"k": {"exact": "1"}}},
            ],
        )
    )
    assert chosen(snap, req("/x")) == "a"
    assert chosen(snap, req("/x", method="PUT")) == "fallback"
    assert chosen(snap, req("/y", method="PUT", headers={"k": "1"})) == "a"


def test_source_labels_and_match_gateways() -> None:
    snap = my_app(
        vs(
            "my-app",
            [
                route_to("a", match=[{"sourceLabels": {"app": "client"}}]),
                route_to("g", match=[{"gateways": ["http-gateway"]}]),
                route_to("fallback"),
            ],
            gateways=["mesh", "http-gateway"],
        ),
        dr("my-app", a={}, g={}, fallback={}),
    )
    assert chosen(snap, req()) == "a"
    assert chosen(snap, req(), Source(namespace="default", labels={"app": "other"})) == "fallback"
    assert chosen(snap, req(authority="my-app.default.svc.cluster.local"), GW) == "g"
    assert route_http(snap, GW, req(authority="my-app")).kind == "no_route"  # Host taken literally
    assert route_http(snap, Source(gateway="default/else"), req()).kind == "no_route"


# -- actions ------------------------------------------------------------------------------------


def one(rule: dict[str, Any], request: HttpRequest | None = None, r: float = 0.5) -> Any:
    snap = my_app(vs("my-app", [rule]), dr("my-app", a={"version": "v1.0.0"}))
    return route_http(snap, MESH, request or req("/p/q?x=1"), rand=const(r))


def test_rewrites() -> None:
    assert (
        one(route_to("a", match=[{"uri": {"prefix": "/p"}}], rewrite={"uri": "/new"})).path
        == "/new/q?x=1"
    )
    assert (
        one(route_to("a", match=[{"uri": {"exact": "/p/q"}}], rewrite={"uri": "/e"})).path
        == "/e?x=1"
    )
    # no uri match: Envoy treats it as prefix "/", so the rewrite replaces the leading slash
    assert one(route_to("a", rewrite={"uri": "/v2/"})).path == "/v2/p/q?x=1"
    d = one(
        route_to(
            "a",
            rewrite={
                "uriRegexRewrite": {"match": "^/p/(.*)$", "rewrite": "/r/\\1"},
                "authority": "new-host",
            },
        )
    )
    assert d.path == "/r/q?x=1"
    assert d.authority == "new-host"


def test_redirect_direct_response_and_headers() -> None:
    d = one({"redirect": {"uri": "/moved", "authority": "b.example", "redirectCode": 302}})
    assert d.kind == "redirect"
    assert d.redirect.status == 302
    assert d.redirect.location == "http://b.example/moved?x=1"
    d = one({"redirect": {"scheme": "https", "port": 8443}}, req("/a", authority="my-app:80"))
    assert d.redirect.location == "https://my-app:8443/a"
    assert d.redirect.status == 301
    d = one({"directResponse": {"status": 418, "body": {"string": "teapot"}}})
    assert d.kind == "direct"
    assert d.direct.status == 418
    assert d.direct.body == b"teapot"
    d = one({"directResponse": {"status": 200, "body": {"bytes": "aGk="}}})
    assert d.direct.body == b"hi"
    d = one(
        {
            "headers": {
                "request": {"set": {"x-a": "1"}, "remove": ["cookie"]},
                "response": {"add": {"x-r": "2"}},
            },
            "route": [
                {
                    "destination": {"host": "my-app", "subset": "a"},
                    "headers": {"request": {"add": {"x-d": "3"}}},
                }
            ],
        }
    )
    assert d.request_headers.apply([("cookie", "c"), ("x-a", "0"), ("keep", "k")]) == [
        ("keep", "k"),
        ("x-a", "1"),
        ("x-d", "3"),
    ]
    assert d.response_headers.apply([]) == [("x-r", "2")]


def test_timeout_retries_fault_and_mirror() -> None:
    d = one(
        route_to(
            "a",
            timeout="1.5s",
            retries={
                "attempts": 3,
                "perTryTimeout": "200ms",
                "retryOn": "gateway-error,connect-failure,409",
            },
        )
    )
    assert d.timeout == 1.5
    assert d.retries.attempts == 3
    assert d.retries.per_try_timeout == 0.2
    assert d.retries.retriable_status(503)
    assert d.retries.retriable_status(409)
    assert not d.retries.retriable_status(500)
    assert d.retries.retriable_failure("timeout")
    assert d.retries.retriable_failure("connect-failure")
    default = one(route_to("a"))
    assert default.timeout is None
    assert default.retries.attempts == 2
    assert default.retries.retriable_status(503)
    assert not default.retries.retriable_status(502)
    # Istio's default names refused-stream: a stream the upstream refused, not any reset.
    assert default.retries.retriable_failure("reset", refused=True)
    assert not default.retries.retriable_failure("reset")
    assert one(route_to("a", retries={"attempts": 0})).retries.attempts == 0
    assert one(route_to("a", timeout="0s")).timeout is None
    fault = {
        "abort": {"httpStatus": 503, "percentage": {"value": 50}},
        "delay": {"fixedDelay": "2s", "percent": 30},
    }
    assert one(route_to("a", fault=fault), r=0.4).fault.abort_status == 503
    assert one(route_to("a", fault=fault), r=0.4).fault.delay == 0.0
    hit = one(route_to("a", fault=fault), r=0.2).fault
    assert hit.delay == 2.0
    assert hit.abort_status == 503
    assert one(route_to("a", fault=fault), r=0.6).fault.abort_status is None
    m = one(route_to("a", mirror={"host": "ratings"}, mirrorPercentage={"value": 25}), r=0.2).mirror
    assert m is not None
    assert m.host == "ratings.default.svc.cluster.local"
    assert m.port == 9080
    assert (
        one(route_to("a", mirror={"host": "ratings"}, mirrorPercentage={"value": 25}), r=0.3).mirror
        is None
    )


def test_default_route_unknown_host_and_missing_subset() -> None:
    snap = my_app()
    d = route_http(snap, MESH, req("/z", host="my-app.default.svc.cluster.local"))
    assert d.route_name == "default"
    assert d.chosen.service.name == "my-app"
    assert d.path == "/z"
    # the authority resolves with the Kubernetes search path when no service host is known
    assert route_http(snap, MESH, req(authority="my-app:80")).chosen.port == 80
    assert route_http(snap, MESH, req(authority="nowhere.example")).kind == "no_route"
    assert route_http(snap, GW, req(authority="my-app")).kind == "no_route"
    d = one(route_to("nope"))
    assert d.chosen.error == "NC"


def test_tcp_weights_and_matches() -> None:
    tcp_vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "db"},
        "spec": {
            "hosts": ["my-app"],
            "tcp": [
                {"match": [{"port": 5432}], "route": [{"destination": {"host": "ratings"}}]},
                {
                    "route": [
                        {"destination": {"host": "my-app", "subset": "a"}, "weight": 75},
                        {"destination": {"host": "my-app", "subset": "b"}, "weight": 25},
                    ]
                },
            ],
        },
    }
    snap = my_app(tcp_vs, dr("my-app", a={"version": "v1.0.0"}, b={"version": "v2.0.0"}))
    host = "my-app.default.svc.cluster.local"
    assert route_tcp(snap, MESH, TcpRequest(host, 5432), rand=const(0.1)).chosen.host.startswith(
        "ratings."
    )
    assert route_tcp(snap, MESH, TcpRequest(host, 80), rand=const(0.7)).chosen.subset == "a"
    assert route_tcp(snap, MESH, TcpRequest(host, 80), rand=const(0.8)).chosen.subset == "b"
    plain = route_tcp(my_app(), MESH, TcpRequest(host, 80))
    assert plain.route_name == "default"
    assert plain.chosen.port == 80
    assert route_tcp(snap, MESH, TcpRequest("x.example", 80)).chosen is None


def test_a_server_requiring_tls_redirects_every_request_to_https() -> None:
    snap = my_app(vs("my-app", [route_to("a")]), dr("my-app", a={"version": "v1.0.0"}))
    gateway = Source(namespace="default", gateway="default/g", require_tls=True)
    request = HttpRequest.from_target("GET", "shop.example.com:8080", "/cart?id=3")
    d = route_http(snap, gateway, request)
    assert d.kind == "redirect"
    assert (d.redirect.status, d.redirect.location) == (301, "https://shop.example.com/cart?id=3")


def test_tls_routes_pick_by_sni_and_gateway() -> None:
    tls_vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "passthrough"},
        "spec": {
            "hosts": ["*.example.com"],
            "gateways": ["g"],
            "tls": [
                {
                    "match": [{"sniHosts": ["db.example.com"], "port": 443}],
                    "route": [{"destination": {"host": "ratings", "port": {"number": 9080}}}],
                },
                {
                    "match": [{"sniHosts": ["*.example.com"]}],
                    "route": [{"destination": {"host": "my-app"}}],
                },
            ],
        },
    }
    snap = my_app(tls_vs)
    gateway = Source(namespace="default", gateway="default/g")
    d = route_tls(snap, gateway, TlsRequest("DB.example.com", 443))
    assert d.route_name == "default/passthrough.0"
    assert d.chosen is not None
    assert d.chosen.service is not None
    assert (d.chosen.service.name, d.chosen.port) == ("ratings", 9080)
    d = route_tls(snap, gateway, TlsRequest("db.example.com", 8443))  # port 443 only
    assert d.chosen is not None
    assert d.route_name == "default/passthrough.1"
    assert route_tls(snap, gateway, TlsRequest("db.other.org", 443)).chosen is None
    assert route_tls(snap, MESH, TlsRequest("db.example.com", 443)).chosen is None
