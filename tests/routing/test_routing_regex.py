"""Regex routes through the compiled snapshot: a hostile route regex cannot stall a decision.

Issue 21 item 3: with a route regex `/(a+)+` one 27-character path held the agent's event loop
2.7 s under Python's `re` (doubling per character). Through RE2 a 40-character path, and a
5,000-character one, decide at once, in the mesh and at the gateway, with every kind of match.
"""

from __future__ import annotations

from typing import Any

import pytest
from deadline import returns_within
from routing_helpers import build, service, workload

from nodeagent.routing import HttpRequest, Source, route_http

GATEWAY = Source(gateway="default/http-gateway")
MESH = Source(namespace="default")


def _snapshot(match: dict[str, Any], *, gateways: list[str] | None = None) -> Any:
    spec: dict[str, Any] = {
        "hosts": ["my-app"],
        "http": [{"match": [match], "route": [{"destination": {"host": "my-app"}}]}],
    }
    if gateways:
        spec["gateways"] = gateways
    vs = {"kind": "VirtualService", "metadata": {"name": "my-app"}, "spec": spec}
    return build(service("my-app"), workload("10.0.0.1", {"app": "my-app"}), vs)


HOSTILE = "a" * 39 + "!"  # 40 characters: 2^40 backtracking steps for `re`


@pytest.mark.parametrize(
    ("match", "request_kw"),
    [
        ({"uri": {"regex": "/(a+)+"}}, {"target": "/" + HOSTILE}),
        ({"uri": {"regex": "/(a+)+"}, "ignoreUriCase": True}, {"target": "/" + HOSTILE}),
        ({"headers": {"x-h": {"regex": "(a+)+b"}}}, {"headers": {"x-h": HOSTILE}}),
        ({"queryParams": {"q": {"regex": "(a|aa)+$"}}}, {"target": "/?q=" + HOSTILE}),
        ({"authority": {"regex": "(a+)+b"}}, {"authority": HOSTILE}),
        ({"method": {"regex": "(a+)+b"}}, {"method": HOSTILE}),
    ],
)
@pytest.mark.parametrize("source", [MESH, GATEWAY], ids=["mesh", "gateway"])
def test_a_hostile_regex_route_decides_promptly(
    match: dict[str, Any], request_kw: dict[str, Any], source: Source
) -> None:
    snap = _snapshot(match, gateways=["http-gateway", "mesh"])
    kw = {"method": "GET", "authority": "my-app", "target": "/", "headers": {}} | request_kw
    request = HttpRequest.from_target(kw["method"], kw["authority"], kw["target"], kw["headers"])
    decision, took = returns_within(10.0, lambda: route_http(snap, source, request))
    assert decision.kind == "no_route"  # the regex does not match the hostile input
    assert took < 0.5, f"deciding took {took:.3f} s"


def test_without_headers_regex_is_linear_too() -> None:
    snap = _snapshot({"withoutHeaders": {"x-h": {"regex": r"^(\w+\s?)*$"}}})
    hostile = "word " * 1000 + "!"
    request = HttpRequest.from_target("GET", "my-app", "/", {"x-h": hostile})
    decision, took = returns_within(10.0, lambda: route_http(snap, MESH, request))
    assert decision.kind == "route"  # the header does not match, so the rule applies
    assert took < 0.5


def test_the_regex_still_matches_what_it_should() -> None:
    snap = _snapshot({"uri": {"regex": "/(a+)+"}})
    hit = route_http(snap, MESH, HttpRequest.from_target("GET", "my-app", "/" + "a" * 5000))
    assert hit.kind == "route"
    assert hit.route_name == "default/my-app.0"
    digits = _snapshot({"uri": {"regex": r"/item/\d+"}})
    assert (
        route_http(digits, MESH, HttpRequest.from_target("GET", "my-app", "/item/42")).kind
        == "route"
    )
    arabic = HttpRequest.from_target("GET", "my-app", "/item/٣")  # RE2's \d is ASCII, as Istio's
    assert route_http(digits, MESH, arabic).kind == "no_route"
