"""The HTTP/1.1 ↔ HTTP/2 bridges on loopback, real sockets: an HTTP/1.1 client (h11, and the
real `curl --http1.1`) served by the HTTP/2 proxy in front of HTTP/2 backends (a `grpc` port),
and an HTTP/2 client (`nodeagent.http2.conn`, and `curl --http2-prior-knowledge`) in front of
HTTP/1.1 backends (an `http` port)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import trio
import trio.testing
from h2_helpers import HOST, H2Backend, curl_h2, service, tcp_connector, vs, workload
from http_helpers import Backend, RawClient, Seen
from snapshot_docs import snapshot_of

from nodeagent.balance import Registry
from nodeagent.http.log import RequestLog
from nodeagent.http2.conn import H2Connection
from nodeagent.http2.proxy import H2Proxy
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot

Serve = Callable[[trio.abc.Stream], Awaitable[None]]
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def snapshot(port_name: str, *extra: dict[str, Any], replicas: int = 1) -> Snapshot:
    docs = [service("app", port_name=port_name)]
    docs += [workload(f"10.0.0.{i}", {"app": "app"}) for i in range(1, replicas + 1)]
    return snapshot_of([*docs, *extra])


@dataclass
class Proxied:
    port: int
    proxy: H2Proxy
    logs: list[RequestLog]


@asynccontextmanager
async def proxied(snap: Snapshot, backends: list[Serve], *, client: str) -> AsyncIterator[Proxied]:
    """Backends as 10.0.0.1.. on loopback, an H2Proxy in front; its clients speak `client`
    ("http1": `serve_http1`, "h2": `serve`)."""
    logs: list[RequestLog] = []
    async with trio.open_nursery() as nursery:
        ports: dict[str, int] = {}
        for i, serve in enumerate(backends, 1):
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            ports[f"10.0.0.{i}"] = listeners[0].socket.getsockname()[1]
        proxy = H2Proxy(
            snapshot=lambda: snap,
            source=Source(namespace="default"),
            connector=tcp_connector(ports),
            registry=Registry(on_event=None),
            on_request=logs.append,
        )
        await nursery.start(proxy.run)
        method = proxy.serve_http1 if client == "http1" else proxy.serve

        async def serve(stream: trio.SocketStream) -> None:
            await method(stream, port=80, host=HOST, client_address="127.0.0.1")

        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield Proxied(listeners[0].socket.getsockname()[1], proxy, logs)
        with trio.fail_after(5):  # a client may read the last byte before the record is written
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        nursery.cancel_scope.cancel()


async def h1_exchange(
    port: int, requests: list[tuple[str, str, list[tuple[str, str]], bytes]]
) -> list[tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]]:
    """Requests on one HTTP/1.1 keep-alive connection: per request (head, body, trailers)."""
    out = []
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)

    async def next_event() -> Any:
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        return event

    for method, target, headers, body in requests:
        data = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        head = await next_event()
        assert isinstance(head, h11.Response), head
        got = b""
        while isinstance(event := await next_event(), h11.Data):
            got += event.data
        assert isinstance(event, h11.EndOfMessage), event
        out.append((head, got, [(bytes(k), bytes(v)) for k, v in event.headers]))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    await stream.aclose()
    return out


def fields(head: h11.Response) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in head.headers}


# -- an HTTP/1.1 client, an HTTP/2 upstream --------------------------------------------------


async def test_an_http1_client_reaches_an_h2_backend_over_one_keepalive_connection() -> None:
    backend = H2Backend("a")
    hop = [("host", "app"), ("connection", "keep-alive, x-hop"), ("keep-alive", "timeout=5")]
    async with proxied(snapshot("grpc"), [backend.serve], client="http1") as p:
        got = await h1_exchange(
            p.port,
            [("GET", "/one", [*hop, ("x-hop", "1"), ("x-end", "2")], b""),
             ("GET", "/two?q=1", [("host", "app")], b"")],
        )  # fmt: skip
    (head1, body1, trailers1), (head2, body2, _) = got
    assert (head1.status_code, body1, head2.status_code, body2) == (
        200, b"a /one", 200, b"a /two?q=1"
    )  # fmt: skip
    # the answer had no length: chunked for the HTTP/1.1 client, its trailers dropped (no TE)
    assert fields(head1)["transfer-encoding"] == "chunked"
    assert trailers1 == []
    seen = backend.seen[0]
    assert (seen[":method"], seen[":path"], seen[":authority"]) == ("GET", "/one", "app")
    assert seen["x-end"] == "2"
    assert not {"connection", "keep-alive", "x-hop", "host", "transfer-encoding"} & set(seen)
    assert backend.connections == 1  # both requests: streams of one pooled connection
    assert [(e.code, e.protocol, e.path) for e in p.logs] == [
        (200, "http", "/one"), (200, "http", "/two?q=1")
    ]  # fmt: skip


async def test_trailers_reach_an_http1_client_that_asked_with_te_trailers() -> None:
    async with proxied(snapshot("grpc"), [H2Backend("a").serve], client="http1") as p:
        [(head, body, trailers)] = await h1_exchange(
            p.port, [("GET", "/t", [("host", "app"), ("te", "trailers")], b"")]
        )
    assert fields(head)["transfer-encoding"] == "chunked"
    assert body == b"a /t"
    assert dict(trailers) == {b"grpc-status": b"0", b"x-trailer": b"yes"}


async def test_a_chunked_request_body_goes_upstream_as_data() -> None:
    backend = H2Backend("a")
    headers = [("host", "app"), ("transfer-encoding", "chunked")]
    sized = [("host", "app"), ("content-length", "5")]
    async with proxied(snapshot("grpc"), [backend.serve], client="http1") as p:
        got = await h1_exchange(
            p.port, [("POST", "/c", headers, b"x" * 70000), ("PUT", "/s", sized, b"hello")]
        )
    assert [body for _, body, _ in got] == [b"x" * 70000, b"hello"]  # echoed
    assert "transfer-encoding" not in backend.seen[0]
    assert backend.seen[1][":method"] == "PUT"
    assert [e.bytes_received for e in p.logs] == [70000, 5]


async def test_a_grpc_fault_to_an_http1_client_is_a_grpc_error_head() -> None:
    route = vs([{"fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "app"}}]}])  # fmt: skip
    grpc = [("host", "app"), ("content-type", "application/grpc"), ("te", "trailers"),
            ("content-length", "1")]  # fmt: skip
    async with proxied(snapshot("grpc", route), [H2Backend("a").serve], client="http1") as p:
        [(head, body, _)] = await h1_exchange(p.port, [("POST", "/pkg.Svc/M", grpc, b"\0")])
    assert head.status_code == 200
    assert fields(head)["grpc-status"] == "14"
    assert fields(head)["content-length"] == "0"
    assert body == b""
    assert (p.logs[-1].protocol, p.logs[-1].grpc_status) == ("grpc", 14)


async def test_curl_http1_on_a_grpc_port_gets_an_http1_answer() -> None:
    async with proxied(snapshot("grpc"), [H2Backend("a").serve], client="http1") as p:
        with trio.fail_after(30):
            proc = await trio.run_process(
                ["curl", "-sS", "-i", "--http1.1", f"http://127.0.0.1:{p.port}/curl"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr
    assert out.startswith("HTTP/1.1 200 OK\r\n"), out
    assert out.endswith("a /curl")
    assert p.logs[-1].code == 200


async def test_an_upstream_reset_mid_answer_closes_the_http1_connection() -> None:
    async def breaks(backend: H2Backend, stream, headers, body) -> None:  # type: ignore[no-untyped-def]
        stream.send_headers([(b":status", b"200")])
        await stream.send_data(b"partial")
        stream.reset()

    async with proxied(snapshot("grpc"), [H2Backend("a", breaks).serve], client="http1") as p:
        stream = await trio.open_tcp_stream("127.0.0.1", p.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        got = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                got += data
        await stream.aclose()
    assert got.startswith(b"HTTP/1.1 200")
    assert b"partial" in got
    assert not got.endswith(b"0\r\n\r\n")  # no final chunk: the answer is visibly cut
    assert "UR" in p.logs[-1].flags


# -- an HTTP/2 client, an HTTP/1.1 upstream --------------------------------------------------


async def h2_exchange(
    port: int, n: int, *, body: bytes = b"hello", extra: list[tuple[bytes, bytes]] = ()
) -> list[tuple[dict[str, str], bytes, dict[str, str]]]:
    out = []
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    conn = H2Connection(transport, client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        for i in range(n):
            head = [(b":method", b"POST" if body else b"GET"), (b":scheme", b"http"),
                    (b":authority", b"app"), (b":path", f"/r{i}".encode()), *extra]  # fmt: skip
            stream = conn.open_stream(head, end_stream=not body)
            if body:
                await stream.send_data(body, end_stream=True)
            got = {k.decode(): v.decode() for k, v in await stream.wait_headers()}
            data = b""
            while chunk := await stream.receive_data():
                data += chunk
            out.append((got, data, {k.decode(): v.decode() for k, v in stream.trailers or []}))
            stream.close()
        nursery.cancel_scope.cancel()
    return out


async def echo_h1(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
    return 201, [("x-backend", seen.backend), ("connection", "keep-alive")], seen.body or b"-"


async def test_an_h2_client_reaches_an_http1_backend_over_keepalive() -> None:
    backend = Backend("b", echo_h1)
    async with proxied(snapshot("http"), [backend.serve], client="h2") as p:
        got = await h2_exchange(p.port, 3)
        got += await h2_exchange(p.port, 1, body=b"", extra=[(b"x-a", b"1")])
    assert [(h[":status"], h["x-backend"], body) for h, body, _ in got] == [
        ("201", "b", b"hello")] * 3 + [("201", "b", b"-")]  # fmt: skip
    assert "connection" not in got[0][0]
    assert got[0][0]["content-length"] == "5"  # the HTTP/1.1 answer's length, kept
    first = backend.seen[0]
    assert (first.method, first.target, first.headers["host"]) == ("POST", "/r0", "app")
    # a body of unknown length (no content-length from the HTTP/2 client): chunked upstream
    assert first.headers["transfer-encoding"] == "chunked"
    assert "transfer-encoding" not in backend.seen[3].headers  # no body, no framing
    assert backend.seen[3].headers["x-a"] == "1"
    assert backend.connections == 1  # one keep-alive upstream connection for every request
    assert p.proxy.statistics()["http1_pool_reuses"] == 3
    assert all(e.code == 201 and e.protocol == "http" for e in p.logs)


async def test_a_content_length_from_the_h2_client_goes_upstream() -> None:
    backend = Backend("b", echo_h1)
    async with proxied(snapshot("http"), [backend.serve], client="h2") as p:
        [(head, body, _)] = await h2_exchange(p.port, 1, extra=[(b"content-length", b"5")])
    assert (head[":status"], body) == ("201", b"hello")
    assert backend.seen[0].headers["content-length"] == "5"
    assert "transfer-encoding" not in backend.seen[0].headers
    assert p.logs[-1].code == 201


async def test_curl_prior_knowledge_on_an_http_port_reaches_an_http1_backend() -> None:
    backend = Backend("b")
    async with proxied(snapshot("http"), [backend.serve], client="h2") as p:
        code, out, err = await curl_h2(p.port, "/x", "-i")
    assert code == 0, err
    assert out.startswith("HTTP/2 200"), out
    assert out.endswith("b /x")
    assert backend.seen[0].headers["host"] == f"127.0.0.1:{p.port}"  # curl's :authority
    assert p.logs[-1].code == 200


async def test_an_http1_backend_that_closes_before_answering_is_a_503() -> None:
    async def closes(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    async with proxied(snapshot("http"), [closes], client="h2") as p:
        [(head, body, _)] = await h2_exchange(p.port, 1)
    assert head[":status"] == "503"
    assert b"reset reason: connection termination" in body
    assert "UR" in p.logs[-1].flags


async def test_a_raw_http1_client_through_the_bridge_keeps_keepalive() -> None:
    """The HTTP/1.1 tests' own client, on the bridge: the same answers as the HTTP/1.1 proxy
    gives (status, body), keep-alive held."""
    async with proxied(snapshot("grpc"), [H2Backend("a").serve], client="http1") as p:
        stream = await trio.open_tcp_stream("127.0.0.1", p.port)
        client = RawClient(stream)
        first = await client.request("GET", "/1")
        second = await client.request("POST", "/2", body=b"payload")
        await stream.aclose()
    assert (first[0], first[2]) == (200, b"a /1")
    assert (second[0], second[2]) == (200, b"payload")
    assert len({e.connection_id for e in p.logs}) == 1


async def test_expect_100_continue_is_answered_once_the_bridge_forwards(tmp_path: Any) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(b"z" * 200_000)
    async with proxied(snapshot("grpc"), [H2Backend("a").serve], client="http1") as p:
        with trio.fail_after(30):
            proc = await trio.run_process(
                ["curl", "-sS", "--http1.1", "-H", "Expect: 100-continue", "--expect100-timeout",
                 "20", "--data-binary", f"@{body}", "-w", " %{http_code}",
                 f"http://127.0.0.1:{p.port}/up"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"z" * 200_000 + b" 200"  # echoed: the upload went on after the 100
    assert p.logs[-1].bytes_received == 200_000


async def test_a_mirrored_copy_of_an_h2_request_goes_to_an_http1_mirror_as_http1() -> None:
    route = vs([{"route": [{"destination": {"host": "app"}}], "mirror": {"host": "app"}}])
    backend = Backend("b", echo_h1)
    async with proxied(snapshot("http", route), [backend.serve], client="h2") as p:
        got = await h2_exchange(p.port, 2)
        with trio.fail_after(5):  # the copies are sent beside the answers
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert [h[":status"] for h, _, _ in got] == ["201", "201"]
    hosts = sorted(s.headers["host"] for s in backend.seen)
    assert hosts == ["app", "app", "app-shadow", "app-shadow"]
    assert all(s.body == b"hello" for s in backend.seen)
    assert p.proxy.statistics()["mirrored"] == 2
