"""HttpProxy write batching: a small request is one upstream write, a small answer one client
write, and a response that trickles in is still streamed (flushed before every wait)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import trio
import trio.testing
from http_helpers import RawClient, app_snapshot, first_endpoint_registry

from nodeagent.http import HttpProxy
from nodeagent.http.headers import new_request_id
from nodeagent.routing import Source
from nodeagent.snapshot.model import Endpoint

MESH = Source(namespace="default", labels={"app": "client"})
HOST = "app.default.svc.cluster.local"


class Recording(trio.abc.Stream):
    """A stream that records every `send_all` (one entry per write the proxy made)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


Serve = Callable[[trio.abc.Stream], Awaitable[None]]


async def read_request(stream: trio.abc.Stream, conn: h11.Connection) -> tuple[h11.Request, bytes]:
    req: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            req = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert req is not None
            return req, body
        else:
            raise AssertionError(f"backend got {event!r}")


async def one_write_backend(stream: trio.abc.Stream) -> None:
    """Answers every request with its body echoed, the whole response in one write."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            _, body = await read_request(stream, conn)
            payload = b"echo:" + body
            data = b"".join(
                conn.send(ev) or b""
                for ev in (
                    h11.Response(status_code=200, headers=[("content-length", str(len(payload)))]),
                    h11.Data(data=payload),
                    h11.EndOfMessage(),
                )
            )
            await stream.send_all(data)
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@asynccontextmanager
async def proxied(serve: Serve) -> AsyncIterator[tuple[RawClient, Recording, list[Recording]]]:
    upstreams: list[Recording] = []
    async with trio.open_nursery() as nursery:

        async def connect(endpoint: Endpoint, port: int) -> trio.abc.Stream:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(serve, b)
            upstreams.append(Recording(a))
            return upstreams[-1]

        proxy = HttpProxy(
            snapshot=app_snapshot,
            source=MESH,
            connector=connect,
            registry=first_endpoint_registry(),
        )
        client, server = trio.testing.memory_stream_pair()
        down = Recording(server)
        nursery.start_soon(partial(proxy.serve, down, port=80, host=HOST))
        yield RawClient(client), down, upstreams
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_small_request_and_answer_are_one_write_each() -> None:
    async with proxied(one_write_backend) as (client, down, upstreams):
        for i in range(3):
            # The whole request in one client write (RawClient.request writes head and body
            # separately, and the proxy must not wait for a body it has not got).
            await client.stream.send_all(
                f"POST /p{i} HTTP/1.1\r\nhost: app\r\ncontent-length: 9\r\n\r\npayload-{i}".encode()
            )
            client.conn.send(h11.Request(method="POST", target="/", headers=[("host", "app")]))
            client.conn.send(h11.EndOfMessage())
            status, _, body = await client.response()
            assert (status, body) == (200, f"echo:payload-{i}".encode())
        status, _, body = await client.request(target="/get")
        assert (status, body) == (200, b"echo:")
    assert len(upstreams) == 1  # keep-alive upstream
    up = upstreams[0].writes
    assert len(up) == 4, up  # head + body + end in one write per request
    assert up[0].startswith(b"POST /p0 HTTP/1.1\r\n")
    assert up[0].endswith(b"\r\n\r\npayload-0")
    assert up[3].startswith(b"GET /get HTTP/1.1\r\n")
    assert len(down.writes) == 4, down.writes  # status line, headers and body in one write
    assert down.writes[0].startswith(b"HTTP/1.1 200 ")
    assert down.writes[0].endswith(b"\r\n\r\necho:payload-0")


async def test_a_trickling_answer_is_flushed_before_waiting() -> None:
    first_part_seen = trio.Event()

    async def trickle(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.send_all(
            (conn.send(h11.Response(status_code=200, headers=[("content-length", "10")])) or b"")
            + (conn.send(h11.Data(data=b"hello")) or b"")
        )
        # The rest only once the client holds the first part: no flush would deadlock here.
        await first_part_seen.wait()
        await stream.send_all(
            (conn.send(h11.Data(data=b"world")) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        )

    async with proxied(trickle) as (client, down, _):
        await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        got = b""
        with trio.fail_after(5):
            while not got.endswith(b"hello"):
                got += await client.stream.receive_some(65536)
            first_part_seen.set()
            while not got.endswith(b"world"):
                got += await client.stream.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 200 ")
    assert len(down.writes) == 2
    assert down.writes[1] == b"world"


async def test_a_body_that_trickles_in_is_streamed_upstream() -> None:
    seen: list[bytes] = []

    async def record(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        _, body = await read_request(stream, conn)
        seen.append(body)
        await stream.send_all(
            b"".join(
                conn.send(ev) or b""
                for ev in (
                    h11.Response(status_code=204, headers=[]),
                    h11.EndOfMessage(),
                )
            )
        )

    async with proxied(record) as (client, _, upstreams):
        await client.stream.send_all(
            b"POST /up HTTP/1.1\r\nhost: app\r\ncontent-length: 6\r\n\r\nabc"
        )
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()  # the proxy now waits for the rest
            # The head and the part already received went out before the proxy waited.
            assert upstreams[0].writes[0].endswith(b"\r\n\r\nabc")
            await client.stream.send_all(b"def")
            answer = await client.stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 204 ")
    assert seen == [b"abcdef"]
    assert upstreams[0].writes[1:] == [b"def"]


def test_request_ids_are_distinct_version_4_uuids() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in list(ids)[:100]:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == value
