"""The destination's HTTP server (`http/inbound.py`) over in-memory streams: the guard decides
each request, allowed ones reach the app kept-alive with the trust-boundary headers set, refused
ones are answered here; and the pure head builder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import trio
import trio.testing
from http_helpers import Backend, RawClient

from nodeagent.authz import DENIED_BODY
from nodeagent.http import RequestLog
from nodeagent.http.guard import RequestFacts, Verdict
from nodeagent.http.headers import destination_head, without_params, xfcc_value
from nodeagent.http.inbound import InboundConnection, InboundHttp, Totals
from nodeagent.telemetry.tracing import Tracer

PEER = "spiffe://cluster.local/ns/client/sa/sleep"
ME = "spiffe://cluster.local/ns/shop/sa/web"


async def policy(facts: RequestFacts) -> Verdict:
    """Public GETs; POST /admin only for the admin; a bad token gets 401."""
    headers = dict(facts.headers)
    if headers.get("authorization") == "Bearer bad":
        return Verdict(False, 401, b"Jwt verification fails", details="jwt_authn_access_denied")
    if facts.method == "GET" and facts.target.startswith("/public/"):
        return Verdict(
            True,
            request_principal="https://issuer/alice",
            remove_headers=frozenset({"authorization"}),
            add_headers=(("x-jwt-group", "dev"),),
            strip_params=frozenset({"access_token"}),
        )
    return Verdict(
        False, 403, DENIED_BODY.encode(), details="rbac_access_denied_matched_policy[none]"
    )


async def answer_once_then_close(stream: trio.abc.Stream) -> None:
    """An app that answers one request (keep-alive, as far as the client can tell) and then
    closes: the idle connection the destination kept is dead."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
    await stream.send_all(
        b"".join(
            conn.send(ev) or b""
            for ev in (
                h11.Response(status_code=200, headers=[("content-length", "5")]),
                h11.Data(data=b"first"),
                h11.EndOfMessage(),
            )
        )
    )
    await stream.aclose()


@asynccontextmanager
async def serving(
    backend: Backend, *, first: Callable[[trio.abc.Stream], Awaitable[None]] | None = None,
    **kw: object,
) -> AsyncIterator[tuple[RawClient, list[RequestLog], list[RequestFacts], Totals]]:  # fmt: skip
    logs: list[RequestLog] = []
    seen: list[RequestFacts] = []

    async def guard(facts: RequestFacts) -> Verdict:
        seen.append(facts)
        return await policy(facts)

    async with trio.open_nursery() as nursery:
        apps = [first] if first is not None else []

        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(apps.pop() if apps else backend.serve, theirs)
            return ours

        server = InboundHttp(guard=guard, **kw)  # type: ignore[arg-type]
        inbound = InboundConnection(
            source_ip="10.0.2.2",
            source_port=40000,
            destination_ip="10.0.1.1",
            port=8080,
            source_identity=PEER,
            connect=connect,
            on_request=logs.append,
            xfcc=xfcc_value(ME, PEER, b"peer-cert-der"),
            span_name="web.shop.svc.cluster.local:8080/*",
        )
        client, theirs = trio.testing.memory_stream_pair()
        totals = Totals()
        nursery.start_soon(partial(server.serve, theirs, inbound, totals))
        yield RawClient(client), logs, seen, totals
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_allowed_requests_reach_the_app_kept_alive_with_trusted_headers() -> None:
    app = Backend("app")
    forged = [("host", "web"), ("x-forwarded-client-cert", "By=evil;URI=spiffe://x/ns/a/sa/b"),
              ("authorization", "Bearer good")]  # fmt: skip
    async with serving(app) as (client, logs, seen, totals):
        for i in range(3):
            status, _, body = await client.request(
                target=f"/public/{i}?access_token=t&q=1", headers=forged
            )
            assert (status, body) == (200, f"app /public/{i}?q=1".encode())
    assert app.connections == 1  # one app connection for the client's keep-alive connection
    assert totals.received == sum(e.bytes_received for e in logs)
    assert totals.sent == sum(e.bytes_sent for e in logs)
    got = app.seen[0].headers
    assert got["x-forwarded-client-cert"].startswith(f"By={ME};Hash=")
    assert got["x-forwarded-client-cert"].endswith(f'Subject="";URI={PEER}')
    assert "authorization" not in got
    assert got["x-jwt-group"] == "dev"
    assert seen[0].source_identity == PEER
    assert seen[0].mtls
    assert [e.code for e in logs] == [200, 200, 200]
    assert logs[0].request_principal == "https://issuer/alice"
    assert logs[0].upstream == "10.0.1.1:8080"
    assert logs[0].downstream_address == "10.0.2.2:40000"
    assert logs[0].bytes_received > 0
    assert logs[0].bytes_sent > 0


async def test_refusals_are_answered_here_and_never_reach_the_app() -> None:
    app = Backend("app")
    async with serving(app) as (client, logs, _, _):
        status, _, body = await client.request("POST", "/admin")
        assert (status, body) == (403, DENIED_BODY.encode())
        status, _, body = await client.request(
            target="/public/a", headers=[("host", "web"), ("authorization", "Bearer bad")]
        )
        assert (status, body) == (401, b"Jwt verification fails")
        status, _, _ = await client.request(target="/public/b")
        assert status == 200
    assert [s.target for s in app.seen] == ["/public/b"]
    assert [(e.code, e.response_flags) for e in logs] == [(403, "UAEX"), (401, "UAEX"), (200, "-")]
    assert logs[0].response_code_details == "rbac_access_denied_matched_policy[none]"


async def test_an_app_that_closed_its_idle_connection_gets_a_fresh_one() -> None:
    app = Backend("app")
    async with serving(app, first=answer_once_then_close) as (client, logs, _, _):
        assert await client.request(target="/public/1") == (200, {"content-length": "5"}, b"first")
        assert (await client.request(target="/public/2"))[2] == b"app /public/2"
    assert [e.code for e in logs] == [200, 200]
    assert logs[1].attempts == 2


async def test_server_span_continues_the_source_span() -> None:
    app = Backend("app")
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with serving(app, tracer=Tracer("n2")) as (client, logs, _, _):
        await client.request(target="/public/t", headers=[("host", "web"), ("traceparent", parent)])
    span = logs[0].span
    assert span is not None
    assert span.span.kind == "SERVER"
    assert span.span.parent_id == "00f067aa0ba902b7"
    assert span.span.name == "web.shop.svc.cluster.local:8080/*"
    sent = app.seen[0].headers["traceparent"]
    assert sent.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert sent.split("-")[2] == span.span.span_id  # the app's parent is this hop's span


def test_destination_head_keeps_the_request_and_replaces_what_this_hop_owns() -> None:
    head = destination_head(
        "POST",
        "/a?access_token=s&b=2",
        [
            ("host", "web"),
            ("connection", "keep-alive, x-drop"),
            ("x-drop", "1"),
            ("x-forwarded-for", "10.0.0.9"),
            ("x-forwarded-client-cert", "forged"),
            ("content-length", "3"),
            ("x-keep", "k"),
        ],
        xfcc="By=me",
        strip_params=frozenset({"access_token"}),
    )
    assert head.target == b"/a?b=2"
    names = [(k.decode(), v.decode()) for k, v in head.headers]
    assert ("x-forwarded-for", "10.0.0.9") in names  # the source agent set it
    assert ("x-forwarded-client-cert", "By=me") in names
    assert all(v != "forged" for _, v in names)
    assert "x-drop" not in dict(names)
    assert dict(names)["content-length"] == "3"
    plain = destination_head("GET", "/", [("host", "web"), ("x-forwarded-client-cert", "f")],
                             xfcc=None)  # fmt: skip
    assert [k for k, _ in plain.headers] == [b"host"]  # plaintext: no client certificate


def test_without_params() -> None:
    names = frozenset({"token"})
    assert without_params("/p?token=a", names) == "/p"
    assert without_params("/p?a=1&token=b&c", names) == "/p?a=1&c"
    assert without_params("/p", names) == "/p"


async def test_a_failing_guard_refuses_and_the_connection_goes_on() -> None:
    app = Backend("app")

    async def broken(facts: RequestFacts) -> Verdict:
        if facts.target == "/boom":
            raise RuntimeError("a policy the validator let through")
        return Verdict(True)

    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(app.serve, theirs)
            return ours

        server = InboundHttp(guard=broken)
        inbound = InboundConnection("10.0.2.2", 1, "10.0.1.1", 8080, PEER, connect)
        client, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve, theirs, inbound)
        raw = RawClient(client)
        assert (await raw.request(target="/boom"))[::2] == (500, b"authorization failed")
        assert (await raw.request(target="/ok"))[0] == 200
        await client.aclose()
    assert [s.target for s in app.seen] == ["/ok"]
