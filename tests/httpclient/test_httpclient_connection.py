"""The shared HTTP/1.1 client against real loopback servers: framing, keep-alive, bounds,
every failure mapped to NotSent / Lost / ProtocolError, TLS with client certificates."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio
from httpclient_helpers import H11Server, free_port, serve, write_pki

from nodeagent.httpclient import ConnectError, HttpConnection, Lost, NotSent, ProtocolError


async def echo(stream: trio.abc.Stream) -> None:
    """Answer every request with its method, target, headers and body as JSON (keep-alive)."""
    srv = H11Server(stream)
    while (got := await srv.request()) is not None:
        req, body = got
        doc = {
            "method": req.method.decode(),
            "target": req.target.decode(),
            "headers": {k.decode(): v.decode() for k, v in req.headers},
            "body": body.decode(),
        }
        out = json.dumps(doc).encode()
        await srv.send(
            h11.Response(status_code=201, headers=[("Content-Length", str(len(out)))]),
            h11.Data(data=out),
            h11.EndOfMessage(),
        )
        srv.next_cycle()


async def raw(nursery: trio.Nursery, answer: bytes, *, close: bool = True) -> int:
    """A server that reads one request head, writes `answer` verbatim, then closes."""

    async def handler(stream: trio.abc.Stream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            buf += data
        await stream.send_all(answer)
        if not close:
            await trio.sleep_forever()

    return await serve(nursery, handler)


async def test_round_trip_and_keep_alive(nursery: trio.Nursery) -> None:
    port = await serve(nursery, echo)
    conn = await HttpConnection.open("127.0.0.1", port, host_header=f"h:{port}")
    try:
        await conn.send("PUT", "/a?b=1", [("X-Test", "yes")], b'{"k": 1}')
        assert await conn.read_head() == 201
        doc = json.loads(await conn.read_body())
        assert (doc["method"], doc["target"], doc["body"]) == ("PUT", "/a?b=1", '{"k": 1}')
        assert doc["headers"]["host"] == f"h:{port}"
        assert doc["headers"]["content-length"] == "8"
        assert doc["headers"]["x-test"] == "yes"
        # a second request on the same connection, once it is readied for one
        assert conn.reusable()
        assert not conn.stale()
        await conn.send("GET", "/second")
        assert await conn.read_head() == 201
        doc = json.loads(await conn.read_body())
        assert (doc["target"], doc["body"], doc["headers"]["content-length"]) == (
            "/second",
            "",
            "0",
        )
    finally:
        await conn.aclose()


async def test_streamed_body_goes_chunked(nursery: trio.Nursery) -> None:
    port = await serve(nursery, echo)

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"one ", b"", b"two ", b"three"):
            yield piece

    conn = await HttpConnection.open("127.0.0.1", port, host_header="h")
    try:
        await conn.send("POST", "/stream", [], pieces())
        assert await conn.read_head() == 201
        doc = json.loads(await conn.read_body())
        assert doc["body"] == "one two three"
        assert doc["headers"]["transfer-encoding"] == "chunked"
        assert "content-length" not in doc["headers"]
    finally:
        await conn.aclose()


async def test_chunked_response_in_pieces_after_informational(nursery: trio.Nursery) -> None:
    pieces = [b'{"a":1}\n', b'{"b":2}\n', b"tail"]

    async def handler(stream: trio.abc.Stream) -> None:
        srv = H11Server(stream)
        assert await srv.request() is not None
        await srv.send(
            h11.InformationalResponse(status_code=100, headers=[]),
            h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]),
        )
        for piece in pieces:
            await srv.send(h11.Data(data=piece))
            await trio.testing.wait_all_tasks_blocked()
        await srv.send(h11.EndOfMessage())

    port = await serve(nursery, handler)
    conn = await HttpConnection.open("127.0.0.1", port, host_header="h")
    try:
        await conn.send("POST", "/watch", [], b"{}")
        assert await conn.read_head() == 200
        got = []
        while (chunk := await conn.read_chunk()) is not None:
            got.append(chunk)
        assert b"".join(got) == b"".join(pieces)
        assert conn.reusable()
    finally:
        await conn.aclose()


async def test_body_over_the_bound(nursery: trio.Nursery) -> None:
    body = b"x" * 2000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"
    port = await raw(nursery, head + body)
    conn = await HttpConnection.open("127.0.0.1", port, host_header="h")
    try:
        await conn.send("GET", "/")
        assert await conn.read_head() == 200
        with pytest.raises(ProtocolError, match="over the 1000 byte bound"):
            await conn.read_body(limit=1000)
    finally:
        await conn.aclose()


async def read_all(conn: HttpConnection) -> bytes:
    await conn.read_head()
    return await conn.read_body()


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (b"", Lost, "^the test server closed the connection before answering$"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b",
            Lost,
            "^the test server closed the connection mid-response",
        ),
        (b"SSH-2.0-OpenSSH\r\n\r\n", ProtocolError, "^bad HTTP from the test server: "),
    ],
)
async def test_failures_after_sending(
    nursery: trio.Nursery, answer: bytes, error: type[Exception], message: str
) -> None:
    port = await raw(nursery, answer)
    conn = await HttpConnection.open("127.0.0.1", port, host_header="h", peer="the test server")
    try:
        await conn.send("GET", "/")
        with pytest.raises(error, match=message):
            await read_all(conn)
    finally:
        await conn.aclose()


async def test_connect_refused_is_not_sent() -> None:
    port = free_port()
    with pytest.raises(ConnectError, match=r"^connect: ") as info:
        await HttpConnection.open("127.0.0.1", port, host_header="h")
    assert isinstance(info.value, NotSent)
    assert "refused" in info.value.reason.lower()


async def test_out_of_turn_request_is_not_sent(nursery: trio.Nursery) -> None:
    port = await raw(nursery, b"", close=False)
    conn = await HttpConnection.open("127.0.0.1", port, host_header="h")
    try:
        await conn.send("GET", "/")
        # no answer read, not readied: h11 refuses, nothing reaches the server
        assert not conn.reusable()
        with pytest.raises(NotSent, match=r"^send: "):
            await conn.send("GET", "/again")
    finally:
        await conn.aclose()


async def test_stale_once_the_server_closes(nursery: trio.Nursery) -> None:
    port = await raw(nursery, b"HTTP/1.1 204 No Content\r\n\r\n")
    conn = await HttpConnection.open("127.0.0.1", port, host_header="h")
    try:
        await conn.send("GET", "/")
        assert await conn.read_head() == 204
        assert await conn.read_body() == b""
        assert conn.reusable()
        assert conn._sock is not None
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(conn._sock)  # the server's FIN
        assert conn.stale()
    finally:
        await conn.aclose()


async def test_connector_streams(nursery: trio.Nursery) -> None:
    async def connector() -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(echo, server)
        return client

    conn = await HttpConnection.open("ignored", 1, host_header="mem", connector=connector)
    try:
        await conn.send("GET", "/mem")
        assert await conn.read_head() == 201
        assert json.loads(await conn.read_body())["headers"]["host"] == "mem"
        assert conn.stale()  # nothing to poll: never handed out again by a pool
    finally:
        await conn.aclose()


async def tls_echo(nursery: trio.Nursery, pki: dict[str, str]) -> int:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
    server_ctx.load_cert_chain(pki["server"], pki["server-key"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED

    async def handler(stream: trio.abc.Stream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await echo(tls)
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass  # a client we refused
        finally:
            await trio.aclose_forcefully(tls)

    return await serve(nursery, handler)


async def test_tls_with_client_certificates(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = write_pki(tmp_path / "good")
    port = await tls_echo(nursery, pki)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(pki["client"], pki["client-key"])
    conn = await HttpConnection.open("127.0.0.1", port, host_header="h", ssl_context=ctx)
    try:
        await conn.send("POST", "/tls", [], b"secret")
        assert await conn.read_head() == 201
        assert json.loads(await conn.read_body())["body"] == "secret"
    finally:
        await conn.aclose()

    # a server signed by a CA we do not trust: refused during the handshake, before sending
    stranger = write_pki(tmp_path / "other")
    untrusting = ssl.create_default_context(cafile=stranger["ca"])
    with pytest.raises(NotSent, match=r"^TLS handshake: .*certificate verify failed"):
        await HttpConnection.open("127.0.0.1", port, host_header="h", ssl_context=untrusting)

    # no client certificate: the server refuses (TLS 1.3 says so after the handshake)
    anonymous = ssl.create_default_context(cafile=pki["ca"])

    async def anonymous_get() -> None:
        conn = await HttpConnection.open("127.0.0.1", port, host_header="h", ssl_context=anonymous)
        try:
            await conn.send("GET", "/")
            await conn.read_head()
        finally:
            await conn.aclose()

    with pytest.raises((NotSent, Lost)):
        await anonymous_get()
