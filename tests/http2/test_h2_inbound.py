"""The destination's HTTP/2 server (`http2/inbound.py`) on loopback: real sockets to an
in-process HTTP/2 app, this package's client connection as the source agent. The guard decides
each stream; allowed ones reach the app with the trust-boundary headers set, bodies and trailers
streamed both ways; refused ones are answered here, as gRPC errors to gRPC clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h2.errors
import trio
import trio.testing
from h2_helpers import H2Backend, Handler, echo

from nodeagent.authz import DENIED_BODY
from nodeagent.http.guard import RequestFacts, Verdict
from nodeagent.http.headers import xfcc_value
from nodeagent.http.inbound import InboundConnection, Totals
from nodeagent.http.limits import Limits
from nodeagent.http.log import RequestLog
from nodeagent.http2.conn import H2Connection, H2Stream, Headers, StreamReset
from nodeagent.http2.destination import destination_headers, local_answer
from nodeagent.http2.inbound import InboundH2
from nodeagent.http2.messages import parse_request
from nodeagent.http2.sniff import PREFACE, sniff_stream
from nodeagent.telemetry.tracing import Tracer

PEER = "spiffe://cluster.local/ns/client/sa/sleep"
ME = "spiffe://cluster.local/ns/shop/sa/web"
XFCC = xfcc_value(ME, PEER, b"peer-cert-der")
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


async def policy(facts: RequestFacts) -> Verdict:
    """/pkg.Svc/Get for the peer; a bad token gets 401; everything else 403."""
    headers = dict(facts.headers)
    if facts.target == "/boom":
        raise RuntimeError("a guard bug")
    if headers.get("authorization") == "Bearer bad":
        return Verdict(False, 401, b"Jwt verification fails", details="jwt_authn_access_denied")
    if facts.target.startswith("/pkg.Svc/Get") and facts.source_identity == PEER:
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


@dataclass
class Served:
    client: H2Connection
    app: H2Backend
    logs: list[RequestLog]
    seen: list[RequestFacts]
    totals: Totals
    connects: list[int] = field(default_factory=list)


@asynccontextmanager
async def serving(
    handler: Handler = echo,
    *,
    app_up: bool = True,
    tracer: Tracer | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[Served]:
    """The app on loopback, an InboundH2 serving one in-memory client connection to it."""
    app = H2Backend("app", handler)
    logs: list[RequestLog] = []
    seen: list[RequestFacts] = []

    async def guard(facts: RequestFacts) -> Verdict:
        seen.append(facts)
        return await policy(facts)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, app.serve, 0, host="127.0.0.1"))
        app_port = listeners[0].socket.getsockname()[1]
        connects: list[int] = []

        async def connect() -> trio.abc.Stream:
            connects.append(1)
            if not app_up:
                raise OSError(111, "connection refused")
            return await trio.open_tcp_stream("127.0.0.1", app_port)

        inbound = InboundConnection(
            source_ip="10.0.2.2",
            source_port=40000,
            destination_ip="10.0.1.1",
            port=8080,
            source_identity=PEER,
            connect=connect,
            on_request=logs.append,
            xfcc=XFCC,
            span_name="web.shop.svc.cluster.local:8080/*",
        )
        server = InboundH2(guard=guard, tracer=tracer, limits=limits)
        ours, theirs = trio.testing.memory_stream_pair()
        totals = Totals()
        nursery.start_soon(partial(server.serve, theirs, inbound, totals))
        client = H2Connection(ours, client=True)
        nursery.start_soon(client.run)
        yield Served(client, app, logs, seen, totals, connects)
        nursery.cancel_scope.cancel()


def head(path: str, *extra: tuple[bytes, bytes]) -> Headers:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"web.shop.svc.cluster.local:8080"),
        (b":path", path.encode()),
        *extra,
    ]


async def call(
    client: H2Connection, path: str, *extra: tuple[bytes, bytes], body: bytes = b"hello"
) -> tuple[dict[str, str], bytes, dict[str, str]]:
    stream = client.open_stream(head(path, *extra), end_stream=not body)
    if body:
        await stream.send_data(body, end_stream=True)
    got = {k.decode(): v.decode() for k, v in await stream.wait_headers()}
    data = b""
    while chunk := await stream.receive_data():
        data += chunk
    trailers = {k.decode(): v.decode() for k, v in stream.trailers or []}
    stream.close()
    return got, data, trailers


async def test_allowed_streams_reach_the_app_with_trusted_headers_on_one_connection() -> None:
    forged = [
        (b"x-forwarded-client-cert", b"By=evil;URI=spiffe://x/ns/a/sa/b"),
        (b"authorization", b"Bearer good"),
    ]
    async with serving() as s:
        for i in range(3):
            got, body, trailers = await call(
                s.client, f"/pkg.Svc/Get?access_token=t&q={i}", *GRPC, *forged
            )
            assert (got[":status"], body) == ("200", b"hello")
            assert trailers == {"grpc-status": "0", "x-trailer": "yes"}
    assert s.app.connections == 1
    assert len(s.connects) == 1
    sent = s.app.seen[0]
    assert sent[":path"] == "/pkg.Svc/Get?q=0"  # the token's query parameter stripped
    assert sent["x-forwarded-client-cert"] == XFCC  # the client's forgery replaced
    assert "authorization" not in sent
    assert sent["x-jwt-group"] == "dev"
    assert sent["te"] == "trailers"
    facts = s.seen[0]
    assert (facts.method, facts.target, facts.source_identity) == (
        "POST",
        "/pkg.Svc/Get?access_token=t&q=0",
        PEER,
    )
    entry = s.logs[0]
    assert (entry.code, entry.protocol, entry.grpc_status) == (200, "grpc", 0)
    assert entry.request_principal == "https://issuer/alice"
    assert entry.upstream_cluster == "inbound|8080||"
    assert s.totals.received == sum(e.bytes_received for e in s.logs) == 15


async def test_a_refused_grpc_call_is_a_grpc_error_and_never_reaches_the_app() -> None:
    async with serving() as s:
        denied = await call(s.client, "/pkg.Svc/Delete", *GRPC)
        unauthenticated = await call(
            s.client, "/pkg.Svc/Get", *GRPC, (b"authorization", b"Bearer bad")
        )
    got, body, _ = denied
    assert (got[":status"], got["grpc-status"], body) == ("200", "7", b"")
    assert got["grpc-message"] == "RBAC: access denied"
    got, _, _ = unauthenticated
    assert (got[":status"], got["grpc-status"]) == ("200", "16")
    assert got["grpc-message"] == "Jwt verification fails"
    assert s.app.seen == []
    assert [(e.code, e.grpc_status, e.response_flags) for e in s.logs] == [
        (200, 7, "UAEX"),
        (200, 16, "UAEX"),
    ]
    assert s.logs[0].response_code_details == "rbac_access_denied_matched_policy[none]"


async def test_a_refused_plain_http2_request_is_403_with_envoys_body() -> None:
    async with serving() as s:
        got, body, _ = await call(s.client, "/admin", body=b"")
    assert (got[":status"], body) == ("403", DENIED_BODY.encode())
    assert (s.logs[0].code, s.logs[0].protocol, s.logs[0].grpc_status) == (403, "http", None)


async def test_a_failing_guard_refuses_and_the_connection_goes_on() -> None:
    async with serving() as s:
        got, body, _ = await call(s.client, "/boom", body=b"")
        again, _, _ = await call(s.client, "/pkg.Svc/Get", *GRPC)
    assert (got[":status"], body) == ("500", b"authorization failed")  # never let through
    assert again[":status"] == "200"
    assert [seen[":path"] for seen in s.app.seen] == ["/pkg.Svc/Get"]  # only the second
    assert (s.logs[0].response_flags, s.logs[0].response_code_details) == ("UAEX", "authz_failed")


async def bidi_echo(
    backend: H2Backend, stream: H2Stream, headers: dict[str, str], _: bytes
) -> None:
    """Echoes each request chunk as it arrives, then trailers (a reset ends it quietly)."""
    stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
    try:
        while chunk := await stream.receive_data():
            await stream.send_data(b"echo:" + chunk)
    except StreamReset:
        backend.name = "reset seen"
        return
    stream.send_trailers([(b"grpc-status", b"0")])


async def test_a_bidirectional_stream_moves_each_message_before_the_next_is_sent() -> None:
    async with serving(bidi_echo) as s:
        stream = s.client.open_stream(head("/pkg.Svc/GetStream", *GRPC, (b"x-stream", b"1")))
        await stream.wait_headers()
        for i in range(5):
            await stream.send_data(f"m{i}".encode())
            with trio.fail_after(5):  # the answer comes before the request ends: no buffering
                assert await stream.receive_data() == f"echo:m{i}".encode()
        stream.end()
        assert await stream.receive_data() == b""
        assert stream.trailers == [(b"grpc-status", b"0")]
        stream.close()
    assert s.logs[0].grpc_status == 0


async def test_a_large_body_streams_through_flow_control_both_ways() -> None:
    body = bytes(range(256)) * 40_000  # 10 MB: ten times the stream window
    async with serving() as s:
        got, back, trailers = await call(s.client, "/pkg.Svc/Get", *GRPC, body=body)
    assert got[":status"] == "200"
    assert back == body
    assert trailers["grpc-status"] == "0"


async def test_app_unreachable_is_unavailable_for_grpc() -> None:
    async with serving(app_up=False) as s:
        got, _, _ = await call(s.client, "/pkg.Svc/Get", *GRPC)
    assert (got[":status"], got["grpc-status"]) == ("200", "14")
    assert s.logs[0].response_flags == "UF"


async def reset_mid_body(
    backend: H2Backend, stream: H2Stream, _h: dict[str, str], _b: bytes
) -> None:
    stream.send_headers([(b":status", b"200")])
    await stream.send_data(b"part")
    stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)


async def test_an_app_reset_mid_body_resets_the_clients_stream() -> None:
    async with serving(reset_mid_body) as s:
        stream = s.client.open_stream(head("/pkg.Svc/Get"), end_stream=True)
        await stream.wait_headers()
        try:
            while await stream.receive_data():
                pass
            raise AssertionError("the stream ended cleanly")
        except StreamReset:
            pass
        await trio.sleep(0.05)
    assert "UR" in s.logs[0].response_flags


async def reset_at_once(
    backend: H2Backend, stream: H2Stream, _h: dict[str, str], _b: bytes
) -> None:
    stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)


async def test_an_app_reset_before_a_head_is_unavailable_for_grpc() -> None:
    async with serving(reset_at_once) as s:
        got, _, _ = await call(s.client, "/pkg.Svc/Get", *GRPC)
    assert (got[":status"], got["grpc-status"]) == ("200", "14")
    assert got["grpc-message"] == "upstream reset before response headers"
    assert (s.logs[0].response_flags, s.logs[0].grpc_status) == ("UR", 14)


async def test_a_client_reset_cancels_the_app_stream_and_the_connection_goes_on() -> None:
    async with serving(bidi_echo) as s:
        stream = s.client.open_stream(head("/pkg.Svc/Get", *GRPC, (b"x-stream", b"1")))
        await stream.wait_headers()
        stream.reset()
        _got, body, _ = await call(s.client, "/pkg.Svc/Get", *GRPC, (b"x-stream", b"1"))
        assert body == b"echo:hello"
        await trio.testing.wait_all_tasks_blocked()
    assert [e.response_flags for e in s.logs] == ["DC", "-"]
    assert s.app.name == "reset seen"  # the app's stream was reset too


async def test_each_stream_gets_a_server_span_continuing_the_callers_trace() -> None:
    tracer = Tracer("web.shop", sample_rate=1.0)
    parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with serving(tracer=tracer) as s:
        await call(s.client, "/pkg.Svc/Get", *GRPC, (b"traceparent", parent))
    sent = s.app.seen[0]["traceparent"]
    assert sent.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert sent != parent.decode()
    assert s.logs[0].trace_id == "0af7651916cd43dd8448eb211c80319c"


async def test_an_idle_client_connection_gets_a_goaway_and_closes() -> None:
    async with serving(limits=Limits(idle_timeout=0.2)) as s:
        await call(s.client, "/pkg.Svc/Get", *GRPC)
        await trio.sleep(1)  # five idle timeouts
    assert not s.client.alive
    assert s.client.goaway
    assert s.client.error == "peer closed the connection"


def test_destination_headers_drop_hop_by_hop_and_forged_trust_headers() -> None:
    raw = head(
        "/p?access_token=x&a=1",
        (b"te", b"trailers"),
        (b"x-forwarded-client-cert", b"forged"),
        (b"authorization", b"Bearer t"),
        (b"keep", b"me"),
    )
    out = destination_headers(
        parse_request(raw),
        xfcc="By=me",
        remove=frozenset({"authorization"}),
        add=(("x-claim", "c"),),
        strip_params=frozenset({"access_token"}),
    )
    assert out == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"web.shop.svc.cluster.local:8080"),
        (b":path", b"/p?a=1"),
        (b"te", b"trailers"),
        (b"keep", b"me"),
        (b"x-claim", b"c"),
        (b"x-forwarded-client-cert", b"By=me"),
    ]


def test_local_answers_are_grpc_errors_for_grpc_clients_only() -> None:
    grpc_head, body, status = local_answer(403, b"RBAC: access denied", grpc=True)
    assert (body, status) == (b"", 7)
    assert (b"grpc-message", b"RBAC: access denied") in grpc_head
    assert local_answer(401, b"Jwt is missing", grpc=True)[2] == 16
    plain, body, status = local_answer(401, b"Jwt is missing", grpc=False)
    assert (plain[0], body, status) == ((b":status", b"401"), b"Jwt is missing", None)


async def test_sniff_stream_gives_the_bytes_it_read_back() -> None:
    for first, want in ((PREFACE + b"rest", "h2"), (b"GET / HTTP/1.1\r\n", "http1")):
        ours, theirs = trio.testing.memory_stream_pair()
        await ours.send_all(first)
        got, replayed = await sniff_stream(theirs, 1)
        assert got == want
        data = b""
        while len(data) < len(first):
            data += await replayed.receive_some(7)
        assert data == first
    ours, theirs = trio.testing.memory_stream_pair()
    got, _ = await sniff_stream(theirs, 0.05)  # silence: not HTTP/2
    assert got == "tcp"
