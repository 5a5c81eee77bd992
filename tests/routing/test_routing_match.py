"""match.py: compiled HTTPMatchRequest / L4 match entries against requests, one condition at
a time (the entries are compiled by the snapshot's route compiler, as the agent does)."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.routing import HttpRequest, Source, TcpRequest
from nodeagent.routing.match import (
    EVERYTHING,
    request_matches,
    route_match,
    string_matches,
    tcp_route_matches,
)
from nodeagent.snapshot.routes import HttpMatch, TcpRoute
from nodeagent.snapshot.routes_compile import compile_routes, string_match


def _match(entry: dict[str, Any], *, namespace: str = "default") -> HttpMatch:
    (route,), _, _ = compile_routes(
        {"http": [{"match": [entry], "route": [{"destination": {"host": "a"}}]}]},
        namespace=namespace,
        name="vs",
        cluster_domain="cluster.local",
    )
    (m,) = route.matches
    return m


def _tcp(match: list[dict[str, Any]]) -> TcpRoute:
    _, (route,), _ = compile_routes(
        {"tcp": [{"match": match, "route": [{"destination": {"host": "a"}}]}]},
        namespace="default",
        name="vs",
        cluster_domain="cluster.local",
    )
    return route


def req(target: str = "/", headers: dict[str, str] | None = None, **kw: Any) -> HttpRequest:
    return HttpRequest.from_target(
        kw.pop("method", "GET"), kw.pop("authority", "a"), target, headers, **kw
    )


MESH = Source(namespace="default", labels={"app": "client", "version": "v1"})


@pytest.mark.parametrize(
    ("doc", "value", "expected"),
    [
        ({"exact": "/a"}, "/a", True),
        ({"exact": "/a"}, "/a/", False),
        ({"prefix": "/a"}, "/ab", True),
        ({"prefix": "/a"}, "/b", False),
        ({"regex": "/a/[0-9]+"}, "/a/12", True),
        ({"regex": "/a/[0-9]+"}, "/a/12/x", False),  # full match, not search
        ({"regex": r"\d+"}, "٣", False),  # RE2's ASCII \d
        ({}, "anything", True),  # an empty StringMatch means "present"
    ],
)
def test_string_match_kinds(doc: dict[str, str], value: str, expected: bool) -> None:
    assert string_matches(string_match("m", doc), value) is expected


def test_ignore_case_folds_exact_and_prefix_but_not_regex() -> None:
    for doc in ({"exact": "/API"}, {"prefix": "/AP"}):
        m = string_match("m", doc, ignore_case=True)
        assert string_matches(m, "/api")
        assert not string_matches(string_match("m", doc), "/api")
    regex = string_match("m", {"regex": "/A[P]I"}, ignore_case=True)  # Envoy: regex keeps case
    assert string_matches(regex, "/API")
    assert not string_matches(regex, "/api")
    assert string_matches(string_match("m", {"regex": "(?i)/A[P]I"}), "/api")


def test_uri_exact_and_regex_ignore_the_query_prefix_sees_it() -> None:
    assert request_matches(_match({"uri": {"exact": "/p"}}), req("/p?x=1"), MESH)
    assert request_matches(_match({"uri": {"regex": "/p"}}), req("/p?x=1"), MESH)
    assert request_matches(_match({"uri": {"prefix": "/p?x"}}), req("/p?x=1"), MESH)
    assert not request_matches(_match({"uri": {"exact": "/p?x=1"}}), req("/p?x=1"), MESH)


def test_method_scheme_authority_and_port() -> None:
    m = _match(
        {
            "method": {"exact": "POST"},
            "scheme": {"exact": "http"},
            "authority": {"prefix": "a"},
            "port": 80,
        }
    )
    assert request_matches(m, req(method="POST"), MESH)
    assert not request_matches(m, req(method="GET"), MESH)
    assert not request_matches(m, req(method="POST", port=9080), MESH)
    assert not request_matches(m, req(method="POST", authority="b"), MESH)
    assert not request_matches(m, req(method="POST", scheme="https"), MESH)


def test_headers_names_are_case_insensitive_and_pseudo_headers_match_fields() -> None:
    m = _match({"headers": {"End-User": {"exact": "jason"}, ":method": {"exact": "GET"}}})
    assert request_matches(m, req(headers={"end-user": "jason"}), MESH)
    assert not request_matches(m, req(headers={"end-user": "json"}), MESH)
    assert not request_matches(m, req(headers={}), MESH)
    assert not request_matches(m, req(headers={"end-user": "jason"}, method="PUT"), MESH)
    path = _match({"headers": {":path": {"regex": "/x\\?y=[0-9]"}}})
    assert request_matches(path, req("/x?y=1"), MESH)


def test_empty_header_match_is_presence_and_without_headers_counts_absence() -> None:
    present = _match({"headers": {"x-debug": {}}})
    assert request_matches(present, req(headers={"x-debug": ""}), MESH)
    assert not request_matches(present, req(), MESH)
    without = _match({"withoutHeaders": {"x-canary": {"exact": "1"}}})
    assert request_matches(without, req(), MESH)
    assert request_matches(without, req(headers={"x-canary": "2"}), MESH)
    assert not request_matches(without, req(headers={"x-canary": "1"}), MESH)


def test_query_params_use_the_first_value() -> None:
    m = _match({"queryParams": {"v": {"exact": "1"}, "debug": {}}})
    assert request_matches(m, req("/?v=1&v=2&debug"), MESH)
    assert not request_matches(m, req("/?v=2&v=1&debug"), MESH)
    assert not request_matches(m, req("/?v=1"), MESH)


def test_source_labels_namespace_and_gateways() -> None:
    m = _match({"sourceLabels": {"app": "client"}, "sourceNamespace": "default"})
    assert request_matches(m, req(), MESH)
    assert not request_matches(m, req(), Source(namespace="default", labels={"app": "x"}))
    assert not request_matches(m, req(), Source(namespace="other", labels={"app": "client"}))
    gw = _match({"gateways": ["http-gateway"]}, namespace="web")
    assert gw.gateways == frozenset({"web/http-gateway"})  # qualified when compiled
    assert request_matches(gw, req(), Source(gateway="web/http-gateway"))
    assert not request_matches(gw, req(), MESH)


def test_a_rule_without_matches_takes_everything_else_the_first_matching_entry() -> None:
    (everything, listed), _, _ = compile_routes(
        {
            "http": [
                {"route": [{"destination": {"host": "a"}}]},
                {
                    "match": [{"uri": {"prefix": "/a"}}, {"uri": {"prefix": "/"}}],
                    "route": [{"destination": {"host": "a"}}],
                },
            ]
        },
        namespace="default",
        name="vs",
        cluster_domain="cluster.local",
    )
    assert route_match(everything, req("/x"), MESH) is EVERYTHING
    assert route_match(listed, req("/a/1"), MESH) is listed.matches[0]
    assert route_match(listed, req("/b"), MESH) is listed.matches[1]
    assert route_match(listed, HttpRequest("GET", "a", "x"), MESH) is None


def test_tcp_matches_port_subnets_and_source() -> None:
    route = _tcp([{"port": 5432, "destinationSubnets": ["10.0.0.0/8"]}, {"sourceNamespace": "db"}])
    assert tcp_route_matches(route, TcpRequest("a", 5432, "10.1.2.3"), MESH)
    assert not tcp_route_matches(route, TcpRequest("a", 5432, "192.168.0.1"), MESH)
    assert not tcp_route_matches(route, TcpRequest("a", 5433, "10.1.2.3"), MESH)
    assert not tcp_route_matches(route, TcpRequest("a", 5432, None), MESH)
    assert tcp_route_matches(route, TcpRequest("a", 1, None), Source(namespace="db"))
    assert tcp_route_matches(_tcp([]), TcpRequest("a", 1), MESH)
