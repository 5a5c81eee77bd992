"""Slow clients and gone clients, in memory on trio's autojump clock: the request-headers
timeout (a header trickle → 408 DT), the stream idle timeout (a body trickle or a stalled
upstream → 408 SI), keep-alive idle (a quiet close), and a client that gives up (code 0, DC,
the upstream attempt cancelled and its connection freed for the next request)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
import trio.testing
from http_helpers import (
    Backend,
    RawClient,
    Reply,
    Seen,
    app_snapshot,
    first_endpoint_registry,
    memory_connector,
)

from nodeagent.http import HttpProxy, Limits, RequestLog
from nodeagent.http.downstream import Downstream
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot

HOST = "app.default.svc.cluster.local"


class Env:
    def __init__(self, proxy: HttpProxy, logs: list[RequestLog], nursery: trio.Nursery) -> None:
        self.proxy = proxy
        self.logs = logs
        self.nursery = nursery

    def client(self) -> trio.testing.MemorySendStream | Any:
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(partial(self.proxy.serve, server, port=80, host=HOST))
        return client


@asynccontextmanager
async def env(
    backends: dict[str, Backend], snapshot: Snapshot | None = None, **limits: Any
) -> AsyncIterator[Env]:
    snap = snapshot or app_snapshot()
    async with trio.open_nursery() as nursery:
        logs: list[RequestLog] = []
        proxy = HttpProxy(
            snapshot=lambda: snap,
            source=Source(namespace="default", labels={"app": "client"}),
            connector=memory_connector(nursery, backends),
            registry=first_endpoint_registry(),
            on_request=logs.append,
            limits=Limits(**limits),
        )
        yield Env(proxy, logs, nursery)
        nursery.cancel_scope.cancel()


async def _read_all(stream: Any) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


async def test_header_trickle_is_cut_with_408_dt(autojump_clock: trio.testing.MockClock) -> None:
    async with env({"10.0.0.1": Backend("v1")}, request_headers_timeout=10.0) as e:
        client = e.client()
        started = trio.current_time()
        await client.send_all(b"GET / HTTP/1.1\r\nHost: app\r\n")

        async def trickle() -> None:
            for i in range(1000):  # one header line a second, never the end of the head
                await trio.sleep(1)
                await client.send_all(f"X-{i}: a\r\n".encode())

        async with trio.open_nursery() as n:
            n.start_soon(trickle)
            received = await _read_all(client)
            n.cancel_scope.cancel()
        assert received.startswith(b"HTTP/1.1 408 "), received
        assert b"connection: close" in received.lower()
        assert 10.0 <= trio.current_time() - started < 11.0
        assert [(x.code, x.response_flags) for x in e.logs] == [(408, "DT")]


async def test_keepalive_idle_closes_quietly(autojump_clock: trio.testing.MockClock) -> None:
    async with env({"10.0.0.1": Backend("v1")}, idle_timeout=60.0) as e:
        stream = e.client()
        client = RawClient(stream)
        assert (await client.request())[0] == 200
        started = trio.current_time()
        assert await _read_all(stream) == b""  # closed without a word: nothing was asked
        assert 60.0 <= trio.current_time() - started < 61.0
        assert [x.code for x in e.logs] == [200]


async def test_body_trickle_is_cut_with_408_si(autojump_clock: trio.testing.MockClock) -> None:
    backend = Backend("v1")
    async with env({"10.0.0.1": backend}, stream_idle_timeout=0.5) as e:
        client = e.client()
        await client.send_all(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n")

        async def trickle() -> None:
            for _ in range(100):  # one byte a second: each gap is longer than the idle timeout
                await client.send_all(b"x")
                await trio.sleep(1)

        async with trio.open_nursery() as n:
            n.start_soon(trickle)
            received = await _read_all(client)
            n.cancel_scope.cancel()
        assert received.startswith(b"HTTP/1.1 408 "), received
        assert [(x.code, x.response_flags) for x in e.logs] == [(408, "SI")]
        assert backend.seen == []  # the request never completed upstream


async def test_a_steady_body_is_not_idle(autojump_clock: trio.testing.MockClock) -> None:
    async with env({"10.0.0.1": Backend("v1")}, stream_idle_timeout=2.0) as e:
        client = e.client()
        await client.send_all(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):  # 10 s in all, never 2 s without a byte
            await trio.sleep(1)
            await client.send_all(b"x")
        received = await client.receive_some(65536)
        assert received.startswith(b"HTTP/1.1 200 "), received


async def test_stalled_upstream_is_408_si(autojump_clock: trio.testing.MockClock) -> None:
    async def stall(seen: Seen) -> Reply:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with env({"10.0.0.1": Backend("v1", stall)}, stream_idle_timeout=2.0) as e:
        stream = e.client()
        started = trio.current_time()
        status, _, _ = await RawClient(stream).request()
        assert status == 408
        assert 2.0 <= trio.current_time() - started < 2.5
        assert [(x.code, x.response_flags) for x in e.logs] == [(408, "SI")]


async def test_client_that_gives_up_cancels_the_attempt_and_frees_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(seen: Seen) -> Reply:
        if seen.target == "/slow":
            await trio.sleep(5)
        return 200, [], b"done"

    one_connection = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "app"},
        "spec": {
            "host": "app",
            "trafficPolicy": {
                "loadBalancer": {"simple": "RANDOM"},
                "connectionPool": {"tcp": {"maxConnections": 1}},
            },
        },
    }
    from http_helpers import build, service, workload

    snap = build(service("app"), workload("10.0.0.1", {"app": "app"}), one_connection)
    async with env({"10.0.0.1": Backend("v1", slow)}, snapshot=snap) as e:
        gives_up = e.client()
        await gives_up.send_all(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        await trio.sleep(1)
        await gives_up.aclose()
        started = trio.current_time()
        status, _, body = await RawClient(e.client()).request(target="/next")
        assert (status, body) == (200, b"done")
        assert trio.current_time() - started < 0.5  # not the slow request's remaining 4 s
        first = e.logs[0]
        assert (first.path, first.code, first.response_flags) == ("/slow", 0, "DC")


async def test_touch_moves_the_idle_deadline_only_once_it_lags_by_the_slack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, _b = trio.testing.memory_stream_pair()
    down = Downstream(a, Limits(stream_idle_timeout=100.0))
    down.idle = trio.CancelScope(deadline=trio.current_time() + 100.0)
    first = down.idle.deadline
    await trio.sleep(0.5)  # under 1% of 100 s: the deadline stays where it was
    down.touch()
    assert down.idle.deadline == first
    await trio.sleep(1.0)  # 1.5 s stale: it moves to a full timeout from now
    down.touch()
    assert down.idle.deadline == trio.current_time() + 100.0
