"""HttpProxy over in-memory streams: routing, h11 edge cases, retries, timeouts, faults, pooling."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from http_helpers import (
    Backend,
    RawClient,
    Seen,
    app_snapshot,
    build,
    dr,
    first_endpoint_registry,
    memory_connector,
    service,
    vs,
    workload,
)

from nodeagent.http import HttpProxy, Limits, RequestLog
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot

MESH = Source(namespace="default", labels={"app": "client"})
HOST = "app.default.svc.cluster.local"


class Harness:
    def __init__(
        self,
        client: RawClient,
        proxy: HttpProxy,
        logs: list[RequestLog],
        client_stream: trio.abc.Stream,
        nursery: trio.Nursery,
    ) -> None:
        self.client = client
        self.proxy = proxy
        self.logs = logs
        self.stream = client_stream
        self.nursery = nursery


@asynccontextmanager
async def harness(
    snapshot: Snapshot, backends: dict[str, Backend], *, fail: set[str] | None = None, **kw: Any
) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        logs: list[RequestLog] = []
        kw.setdefault("registry", first_endpoint_registry())
        proxy = HttpProxy(
            snapshot=lambda: snapshot,
            source=MESH,
            connector=memory_connector(nursery, backends, fail),
            on_request=logs.append,
            **kw,
        )
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(
            partial(proxy.serve, server, port=80, host=HOST, client_address="10.9.9.9")
        )
        yield Harness(RawClient(client), proxy, logs, client, nursery)
        await client.aclose()
        nursery.cancel_scope.cancel()


def backends() -> dict[str, Backend]:
    return {"10.0.0.1": Backend("v1"), "10.0.0.2": Backend("v2")}


async def test_keepalive_requests_reuse_one_upstream_connection() -> None:
    b = backends()
    async with harness(app_snapshot(), b) as h:
        for i in range(3):
            status, _headers, body = await h.client.request(target=f"/r{i}?q=1")
            assert status == 200
            assert body == f"v1 /r{i}?q=1".encode()
    assert b["10.0.0.1"].connections == 1
    assert h.proxy.pool.stats.reuses == 2
    seen = b["10.0.0.1"].seen[0]
    assert seen.headers["host"] == "app"
    assert seen.headers["x-forwarded-for"] == "10.9.9.9"
    assert seen.headers["x-forwarded-proto"] == "http"
    assert len(seen.headers["x-request-id"]) == 36
    assert [e.code for e in h.logs] == [200, 200, 200]
    assert h.logs[0].route_name == "default"
    assert h.logs[0].upstream == "10.0.0.1:8080"
    assert h.logs[0].response_flags == "-"


async def test_chunked_request_and_response_stream_through() -> None:
    async def big(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        return 200, [("transfer-encoding", "chunked")], seen.body * 3

    b = {"10.0.0.1": Backend("v1", big)}
    payload = bytes(range(256)) * 1000
    async with harness(app_snapshot(), b) as h:
        status, headers, body = await h.client.request(
            "POST", "/up", [("host", "app"), ("transfer-encoding", "chunked")], payload
        )
    assert status == 200
    assert body == payload * 3
    assert headers.get("transfer-encoding") == "chunked"
    assert b["10.0.0.1"].seen[0].headers["transfer-encoding"] == "chunked"
    assert h.logs[0].bytes_received > len(payload)


async def test_malformed_request_is_400_and_huge_headers_431() -> None:
    async with harness(app_snapshot(), backends()) as h:
        await h.stream.send_all(b"GARBAGE / HTTP/9\r\n\r\n")
        data = await h.stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 400 ")
    async with harness(app_snapshot(), backends(), limits=Limits(max_header_bytes=4096)) as h:
        await h.stream.send_all(
            b"GET / HTTP/1.1\r\nhost: app\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n"
        )
        data = await h.stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 431 ")
    assert h.logs[0].code == 431
    assert h.logs[0].flags == ["DPE"]
    async with harness(app_snapshot(), backends(), limits=Limits(max_headers=5)) as h:
        status, _, _ = await h.client.request(
            headers=[("host", "app")] + [(f"x-{i}", "1") for i in range(6)]
        )
        assert status == 431


async def test_no_route_upstream_failures_and_flags() -> None:
    snap = app_snapshot(
        vs(
            "app",
            [
                {
                    "match": [{"uri": {"prefix": "/v"}}],
                    "route": [{"destination": {"host": "app", "subset": "v1"}}],
                },
                {
                    "match": [{"uri": {"prefix": "/nc"}}],
                    "route": [{"destination": {"host": "app", "subset": "v9"}}],
                },
            ],
        )
    )
    async with harness(snap, backends(), fail={"10.0.0.1"}) as h:
        assert (await h.client.request(target="/x"))[0] == 404
        status, _, body = await h.client.request(target="/v")
        assert status == 503
        assert b"connection failure" in body
        assert (await h.client.request(target="/nc"))[0] == 503
    assert [(e.code, e.response_flags) for e in h.logs] == [
        (404, "NR"),
        (503, "UF,URX"),
        (503, "NC"),
    ]
    assert h.logs[1].attempts == 3  # Istio's default policy retries connect failures twice


async def test_no_endpoints_is_uh() -> None:
    snap = build(
        service("app"),
        workload("10.0.0.1", {"app": "app", "version": "v1"}),
        dr("app", v3={"version": "v3"}),
        vs("app", [{"route": [{"destination": {"host": "app", "subset": "v3"}}]}]),
    )
    async with harness(snap, backends()) as h:
        status, _, body = await h.client.request()
        assert (status, body) == (503, b"no healthy upstream")
    assert h.logs[0].flags == ["UH"]


async def test_retries_turn_flaky_503s_into_success() -> None:
    calls = 0

    async def flaky(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        nonlocal calls
        calls += 1
        return (503, [], b"busy") if calls % 3 else (200, [], seen.body)

    rule = {
        "route": [{"destination": {"host": "app", "subset": "v1"}}],
        "retries": {"attempts": 3, "retryOn": "5xx"},
    }
    b = {"10.0.0.1": Backend("v1", flaky)}
    async with harness(app_snapshot(vs("app", [rule])), b) as h:
        status, _, body = await h.client.request("POST", "/", body=b"hello")
        assert (status, body) == (200, b"hello")
        assert h.logs[-1].attempts == 3
    assert [s.body for s in b["10.0.0.1"].seen] == [b"hello"] * 3
    # exhausted: the last 503 goes to the client with URX
    rule["retries"] = {"attempts": 1, "retryOn": "5xx"}
    calls = 0
    async with harness(app_snapshot(vs("app", [rule])), b) as h:
        status, _, body = await h.client.request()
        assert (status, body) == (503, b"busy")
    assert h.logs[-1].flags == ["URX"]
    assert h.logs[-1].attempts == 2


async def test_body_over_retry_buffer_is_not_retried() -> None:
    async def fail(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        return 503, [], b""

    rule = {
        "route": [{"destination": {"host": "app", "subset": "v1"}}],
        "retries": {"attempts": 3, "retryOn": "5xx"},
    }
    b = {"10.0.0.1": Backend("v1", fail)}
    async with harness(
        app_snapshot(vs("app", [rule])), b, limits=Limits(retry_buffer_bytes=1000)
    ) as h:
        assert (await h.client.request("POST", "/", body=b"x" * 5000))[0] == 503
        assert (await h.client.request("POST", "/", body=b"x" * 500))[0] == 503
    assert [e.attempts for e in h.logs] == [1, 4]
    assert len(b["10.0.0.1"].seen[0].body) == 5000


async def test_route_timeout_and_per_try_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def slow(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        await trio.sleep(10 if seen.target == "/slow" else 0)
        return 200, [], b"done"

    rules = [
        {
            "match": [{"uri": {"exact": "/slow"}}],
            "timeout": "2s",
            "retries": {"attempts": 0},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
        {
            "timeout": "5s",
            "retries": {"attempts": 2, "perTryTimeout": "1s", "retryOn": "gateway-error"},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
    ]
    async with harness(app_snapshot(vs("app", rules)), {"10.0.0.1": Backend("v1", slow)}) as h:
        start = trio.current_time()
        status, _, body = await h.client.request(target="/slow")
        assert status == 504
        assert body == b"upstream request timeout"
        assert 2.0 <= trio.current_time() - start < 2.5
    assert h.logs[0].flags == ["UT"]
    calls = 0

    async def slow_first(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep(30)
        return 200, [], b"second"

    async with harness(
        app_snapshot(vs("app", rules)), {"10.0.0.1": Backend("v1", slow_first)}
    ) as h:
        start = trio.current_time()
        status, _, body = await h.client.request(target="/x")
        assert (status, body) == (200, b"second")
        assert 1.0 <= trio.current_time() - start < 1.5
        assert h.logs[0].attempts == 2


async def test_fault_delay_and_abort(autojump_clock: trio.testing.MockClock) -> None:
    rules = [
        {
            "match": [{"uri": {"prefix": "/abort"}}],
            "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
        {
            "fault": {"delay": {"fixedDelay": "7s", "percent": 100}},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
    ]
    b = backends()
    async with harness(app_snapshot(vs("app", rules)), b) as h:
        start = trio.current_time()
        assert (await h.client.request(target="/d"))[0] == 200
        assert trio.current_time() - start >= 7.0
        status, _, body = await h.client.request(target="/abort")
        assert (status, body) == (503, b"fault filter abort")
    assert [e.response_flags for e in h.logs] == ["DI", "FI"]
    assert len(b["10.0.0.1"].seen) == 1


async def test_expect_100_continue_answered_only_when_forwarding() -> None:
    b = backends()
    async with harness(app_snapshot(), b) as h:
        await h.stream.send_all(
            b"POST /e HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        data = await h.stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 100 ")
        await h.stream.send_all(b"hello")
        status, _, _body = await h.client.response()
        assert status == 200
    assert b["10.0.0.1"].seen[0].body == b"hello"
    assert "expect" not in b["10.0.0.1"].seen[0].headers
    snap = app_snapshot(
        vs(
            "app",
            [
                {
                    "match": [{"uri": {"prefix": "/only"}}],
                    "route": [{"destination": {"host": "app"}}],
                }
            ],
        )
    )
    async with harness(snap, backends()) as h:
        await h.stream.send_all(
            b"POST /e HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        data = await h.stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 404 ")
        assert b"connection: close" in data.lower()


async def test_upgrade_is_spliced_after_101() -> None:
    b = {"10.0.0.1": Backend("v1", upgrade_echo=True)}
    async with harness(app_snapshot(), b) as h:
        await h.stream.send_all(
            b"GET /ws HTTP/1.1\r\nhost: app\r\nconnection: Upgrade\r\n"
            b"upgrade: websocket\r\n\r\nearly"
        )
        data = b""
        while b"echo:early" not in data:
            data += await h.stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 101 ")
        await h.stream.send_all(b"ping")
        assert await h.stream.receive_some(65536) == b"echo:ping"
    assert b["10.0.0.1"].seen[0].headers["upgrade"] == "websocket"


async def test_headers_rewrite_redirect_direct_and_mirror() -> None:
    rules = [
        {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new"}},
        {
            "match": [{"uri": {"prefix": "/teapot"}}],
            "directResponse": {"status": 418, "body": {"string": "short"}},
        },
        {
            "match": [{"uri": {"prefix": "/api"}}],
            "rewrite": {"uri": "/v2", "authority": "backend"},
            "headers": {
                "request": {"set": {"x-set": "1"}, "remove": ["cookie"]},
                "response": {"add": {"x-resp": "yes"}},
            },
            "mirror": {"host": "app", "subset": "v2"},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
    ]
    b = backends()
    async with harness(app_snapshot(vs("app", rules)), b) as h:
        status, headers, _ = await h.client.request(target="/old?a=1")
        assert (status, headers["location"]) == (301, "http://app/new?a=1")
        assert (await h.client.request(target="/teapot"))[::2] == (418, b"short")
        status, headers, _ = await h.client.request(
            target="/api/x", headers=[("host", "app"), ("cookie", "c"), ("x-request-id", "rid-1")]
        )
        assert status == 200
        assert headers["x-resp"] == "yes"
        await trio.testing.wait_all_tasks_blocked()  # the mirror's copy has been answered
    seen = b["10.0.0.1"].seen[0]
    assert (seen.target, seen.headers["host"], seen.headers["x-set"]) == ("/v2/x", "backend", "1")
    assert "cookie" not in seen.headers
    assert seen.headers["x-request-id"] == "rid-1"
    assert b["10.0.0.2"].seen[0].headers["host"] == "backend-shadow"


async def test_stale_pooled_connection_is_replaced_transparently() -> None:
    class Closing(Backend):
        async def serve(self, stream: trio.abc.Stream) -> None:
            # answers one request with keep-alive semantics, then closes anyway
            self.connections += 1
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await stream.aclose()

    b: dict[str, Backend] = {"10.0.0.1": Closing("v1")}
    snap = app_snapshot(
        vs(
            "app",
            [
                {
                    "route": [{"destination": {"host": "app", "subset": "v1"}}],
                    "retries": {"attempts": 0},
                }
            ],
        )
    )
    async with harness(snap, b) as h:
        for _ in range(3):
            assert (await h.client.request())[0] == 200
    assert b["10.0.0.1"].connections == 3
    assert [e.attempts for e in h.logs] == [1, 1, 1]


@pytest.mark.parametrize(
    "raw",
    [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: app\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: app\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nhost: app\r\ncontent-length: 100\r\n\r\nshort",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ],
)
async def test_malformed_input_never_crashes_the_proxy(raw: bytes) -> None:
    b = backends()
    async with harness(app_snapshot(), b) as h:
        await h.stream.send_all(raw)
        await h.stream.send_eof()
        data = b""
        with trio.fail_after(5):
            while chunk := await h.stream.receive_some(65536):
                data += chunk
    # either a 4xx/5xx answer or a plain close; the proxy task itself ended cleanly
    assert data == b"" or data.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5", b"HTTP/1.1 200"))
    assert all(e.code != 0 or e.flags for e in h.logs)


async def test_a_draining_proxy_closes_keepalive_connections_after_their_response() -> None:
    b = backends()
    async with harness(app_snapshot(), b) as h:
        status, headers, _ = await h.client.request(target="/before")
        assert (status, "connection" in headers) == (200, False)
        h.proxy.drain()
        status, headers, body = await h.client.request(target="/during")
        assert (status, headers["connection"], body) == (200, "close", b"v1 /during")
        assert await h.stream.receive_some(100) == b""  # the proxy closed: reconnect
    teapot = {"match": [{"uri": {"prefix": "/teapot"}}], "directResponse": {"status": 418}}
    async with harness(app_snapshot(vs("app", [teapot])), b) as h:
        h.proxy.drain()
        status, headers, _ = await h.client.request(target="/teapot")
        assert (status, headers["connection"]) == (418, "close")  # local answers too
        assert await h.stream.receive_some(100) == b""


async def _read_request(stream: trio.abc.Stream) -> bytes:
    """One whole request (head and Content-Length body) from `stream`; b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = await stream.receive_some(65536)
        if not more:
            return b""
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = (
        int(head.lower().split(b"content-length: ", 1)[1].split(b"\r")[0] or 0)
        if (b"content-length: " in head.lower())
        else 0
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return data


class AnswersOnceThenHangsUp(Backend):
    """Answers the first request of each connection (after `delay`), then reads the next one
    whole and closes without a byte of answer (a server that closed an idle connection)."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__(name)
        self.delay = delay

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        await _read_request(stream)
        self.seen.append(Seen("", "", {}, b"", self.name))
        await trio.sleep(self.delay)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        if await _read_request(stream):
            self.seen.append(Seen("", "", {}, b"", self.name))
        await stream.aclose()


NO_RETRIES = [
    {"route": [{"destination": {"host": "app", "subset": "v1"}}], "retries": {"attempts": 0}}
]


async def test_a_stale_pooled_connection_is_retried_on_a_fresh_one_not_another_idle_one() -> None:
    b: dict[str, Backend] = {"10.0.0.1": AnswersOnceThenHangsUp("v1", delay=0.01)}
    async with harness(app_snapshot(vs("app", NO_RETRIES)), b) as h:
        # Two requests at once on two client connections: two upstream connections, both
        # back in the pool and both closed by the server after their answer.
        other, server = trio.testing.memory_stream_pair()
        h.nursery.start_soon(partial(h.proxy.serve, server, port=80, host=HOST))
        second = RawClient(other)
        async with trio.open_nursery() as both:
            both.start_soon(h.client.request)
            both.start_soon(second.request)
        assert h.proxy.pool.idle_count() == 2
        assert (await h.client.request(target="/again"))[0] == 200
        await other.aclose()
    assert b["10.0.0.1"].connections == 3  # the stale one, then a fresh one (not the other idle)
    assert [e.attempts for e in h.logs][-1] == 1  # not counted as a retry
    assert h.logs[-1].response_flags == "-"


async def test_a_non_idempotent_request_on_a_stale_connection_is_not_sent_again() -> None:
    b: dict[str, Backend] = {"10.0.0.1": AnswersOnceThenHangsUp("v1")}
    async with harness(app_snapshot(vs("app", NO_RETRIES)), b) as h:
        assert (await h.client.request("POST", body=b"x"))[0] == 200
        status, _, _ = await h.client.request("POST", body=b"y")  # the server may have acted
        assert status == 503
        assert (await h.client.request())[0] == 200  # a new connection, then pooled
        status, _, _ = await h.client.request("PUT", body=b"z")  # idempotent: sent again
        assert status == 200
    assert [e.response_flags for e in h.logs] == ["-", "UR", "-", "-"]
    assert b["10.0.0.1"].connections == 3  # the PUT went again on a fresh one
