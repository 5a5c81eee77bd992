"""The pure header rewriting (`http/headers.py`): the upstream head, response headers, ids."""

from __future__ import annotations

import re

import h11

from nodeagent.http.headers import (
    head_size,
    is_upgrade,
    joined,
    new_request_id,
    response_head,
    response_headers,
    upstream_head,
)
from nodeagent.routing import HeaderOps, HttpRequest, RouteDecision


def _request(headers: list[tuple[str, str]], target: str = "/p") -> HttpRequest:
    return HttpRequest.from_target("POST", "app", target, joined(headers), port=80)


def _head(
    headers: list[tuple[str, str]],
    *,
    decision: RouteDecision | None = None,
    client: str | None = "10.0.0.9",
    trace: list[tuple[str, str]] | None = None,
) -> dict[str, list[str]]:
    request = _request(headers)
    head = upstream_head(
        request,
        headers,
        decision or RouteDecision(kind="route", path="/p", authority="app.default"),
        request_id="rid-1",
        trace_headers=trace or [],
        client_address=client,
        upgrade=is_upgrade(request),
    )
    out: dict[str, list[str]] = {}
    for k, v in head.headers:
        out.setdefault(k.decode(), []).append(v.decode())
    return out


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    got = _head(
        [
            ("host", "app"),
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("expect", "100-continue"),
            ("x-kept", "yes"),
        ]
    )
    assert got["host"] == ["app.default"]
    assert got["x-kept"] == ["yes"]
    for name in ("connection", "keep-alive", "x-secret", "te", "expect"):
        assert name not in got, name


def test_forwarding_headers_are_this_hops() -> None:
    got = _head(
        [("host", "app"), ("x-forwarded-for", "1.2.3.4"), ("x-request-id", "client-supplied")]
    )
    assert got["x-forwarded-for"] == ["1.2.3.4, 10.0.0.9"]
    assert got["x-forwarded-proto"] == ["http"]
    assert got["x-request-id"] == ["rid-1"]  # the caller decides which id (kept or new)
    assert "x-forwarded-for" not in _head([("host", "app")], client=None)


def test_framing_is_re_serialised_from_the_parsed_request() -> None:
    assert _head([("host", "app"), ("content-length", "5")])["content-length"] == ["5"]
    chunked = _head([("host", "app"), ("transfer-encoding", "chunked")])
    assert chunked["transfer-encoding"] == ["chunked"]
    assert "content-length" not in chunked


def test_route_header_ops_and_trace_headers_apply() -> None:
    decision = RouteDecision(
        kind="route",
        path="/p",
        authority="app",
        request_headers=HeaderOps(set=(("x-set", "s"),), add=(("x-add", "a"),), remove=("x-rm",)),
    )
    got = _head(
        [("host", "app"), ("x-rm", "1"), ("x-b3-traceid", "old")],
        decision=decision,
        trace=[("x-b3-traceid", "new")],
    )
    assert got["x-set"] == ["s"]
    assert got["x-add"] == ["a"]
    assert "x-rm" not in got
    assert got["x-b3-traceid"] == ["new"]


def test_upgrade_is_forwarded_as_an_upgrade() -> None:
    got = _head([("host", "app"), ("connection", "Upgrade"), ("upgrade", "websocket")])
    assert got["connection"] == ["upgrade"]
    assert got["upgrade"] == ["websocket"]
    assert not is_upgrade(_request([("host", "app"), ("upgrade", "websocket")]))


def test_response_headers_drop_hop_by_hop_and_apply_ops() -> None:
    response = h11.Response(
        status_code=200,
        headers=[("content-length", "0"), ("connection", "keep-alive"), ("x-a", "1")],
    )
    got = response_headers(response, HeaderOps(set=(("x-b", "2"),)))
    assert ("connection", "keep-alive") not in got
    assert ("x-a", "1") in got
    assert ("x-b", "2") in got


def test_request_ids_are_version_4_uuids_and_distinct() -> None:
    ids = {new_request_id() for _ in range(200)}
    assert len(ids) == 200
    pattern = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    assert all(pattern.match(i) for i in ids)


def test_head_size_counts_target_and_headers() -> None:
    req = h11.Request(method="GET", target="/abc", headers=[("host", "h"), ("x", "yy")])
    assert head_size(req) == 4 + (4 + 1 + 4) + (1 + 2 + 4)


def _wire(event: h11.Event, role: type[h11.CLIENT] | type[h11.SERVER]) -> bytes:
    conn = h11.Connection(role)
    if role is h11.SERVER:
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        conn.next_event()
    return conn.send(event) or b""


def test_an_unrewritten_head_skips_revalidation_with_the_same_bytes() -> None:
    headers = [("host", "app"), ("x-b3-traceid", "ab"), ("content-length", "3"), ("x-k", "v")]
    request = _request(headers)
    kwargs = {"request_id": "rid-1", "client_address": "10.0.0.9", "upgrade": False}
    trace = [("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")]
    fast = upstream_head(
        request, headers, RouteDecision(kind="route", path="/p", authority="app"),
        trace_headers=trace, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    # A header operation that changes nothing still takes the validating path: the reference.
    validated = upstream_head(
        request, headers, RouteDecision(kind="route", path="/p", authority="app",
                                        request_headers=HeaderOps(remove=("x-none",))),
        trace_headers=trace, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    assert _wire(fast, h11.CLIENT) == _wire(validated, h11.CLIENT)


def test_configured_values_are_still_validated() -> None:
    headers = [("host", "app")]
    bad = HeaderOps(set=(("x-evil", "a\r\nx-injected: 1"),))
    for decision in (
        RouteDecision(kind="route", path="/p", authority="app", request_headers=bad),
        RouteDecision(kind="route", path="/p\r\nx: 1", authority="app"),
        RouteDecision(kind="route", path="/p", authority="a\r\nx: 1"),
    ):
        try:
            upstream_head(_request(headers), headers, decision, request_id="r",
                          trace_headers=[], client_address=None, upgrade=False)  # fmt: skip
        except h11.LocalProtocolError:
            continue
        raise AssertionError(f"{decision} was not validated")
    response = h11.Response(status_code=200, headers=[("content-length", "0")])
    try:
        response_head(response, bad)
    except h11.LocalProtocolError:
        return
    raise AssertionError("a response header operation was not validated")


def test_the_response_head_without_operations_has_the_same_bytes() -> None:
    response = h11.Response(
        status_code=200,
        reason=b"OK",
        headers=[("Content-Length", "2"), ("Connection", "keep-alive"), ("X-App", "1")],
    )
    fast = response_head(response, HeaderOps())
    validated = response_head(response, HeaderOps(remove=("x-none",)))
    assert _wire(fast, h11.SERVER) == _wire(validated, h11.SERVER)
    assert b"keep-alive" not in _wire(fast, h11.SERVER).lower()
