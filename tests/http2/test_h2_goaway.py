"""The graceful GOAWAY (RFC 9113 §6.8): h2 alone closes the whole connection on any GOAWAY
(python-hyper/h2#1181), so a server's drain — ours at a restart, an app's gRPC server at its
max connection age — would fail the streams under way. `nodeagent.tunnel.goaway` keeps them
going; here sans-IO, then through the H2Proxy on loopback."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
import trio
from h2_helpers import HOST, H2Backend, app_snapshot, running, vs

from nodeagent.http2.conn import H2Connection, H2Stream, StreamReset
from nodeagent.tunnel.goaway import DrainSet, GracefulH2Connection

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


def _pair(
    client_cls: type[h2.connection.H2Connection], server_cls: type[h2.connection.H2Connection]
) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = client_cls(h2.config.H2Configuration(client_side=True))
    server = server_cls(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    return client, server


def test_streams_under_a_graceful_goaway_go_on_both_ways() -> None:
    client, server = _pair(GracefulH2Connection, GracefulH2Connection)
    assert isinstance(server, GracefulH2Connection)
    server.announce_goaway()
    server.send_headers(1, [(b":status", b"200")])
    events = client.receive_data(server.data_to_send())
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert [(g.error_code, g.last_stream_id) for g in goaway] == [(0, 1)]
    client.send_data(1, b"more of the request", end_stream=True)  # h2 alone: ProtocolError
    got = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.DataReceived) for e in got)
    server.send_data(1, b"the answer", end_stream=True)
    got = client.receive_data(server.data_to_send())
    assert any(isinstance(e, h2.events.StreamEnded) for e in got)


def test_plain_h2_would_have_failed_the_stream() -> None:
    """What the subclass is for: the same exchange with h2's own class breaks."""
    _client, server = _pair(h2.connection.H2Connection, h2.connection.H2Connection)
    server.close_connection()
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_headers(1, [(b":status", b"200")])


def test_a_goaway_with_an_error_still_closes_at_once() -> None:
    client, server = _pair(GracefulH2Connection, h2.connection.H2Connection)
    server.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
    client.receive_data(server.data_to_send())
    assert isinstance(client, GracefulH2Connection)
    assert client.closed
    with pytest.raises(h2.exceptions.ProtocolError):
        client.send_data(1, b"x")


class _Conn:
    def __init__(self) -> None:
        self.drained = 0

    def drain(self) -> None:
        self.drained += 1


def test_drain_set_drains_the_open_connections_and_later_ones() -> None:
    drains = DrainSet()
    first = _Conn()
    with drains.serving(first):
        drains.drain()
        assert first.drained == 1
        with drains.serving(_Conn()) as later:  # accepted while draining
            assert later.drained == 1
    assert len(drains) == 0


async def slow_answer(backend: H2Backend, stream: H2Stream, headers, body) -> None:  # type: ignore[no-untyped-def]
    await trio.sleep(float(headers.get("x-sleep", "0")))
    stream.send_headers([(b":status", b"200"), (b"x-backend", backend.name.encode())])
    await stream.send_data(f"{backend.name} after {body.decode()}".encode())
    stream.send_trailers([(b"grpc-status", b"0")])


async def aged_out(backend: H2Backend, stream: H2Stream, headers, body) -> None:  # type: ignore[no-untyped-def]
    """A gRPC server at its max connection age: a graceful GOAWAY, then the answer."""
    stream.conn.drain()
    await trio.sleep(0.2)  # the proxy has the GOAWAY before the answer's frames
    await slow_answer(backend, stream, headers, body)


async def _request(conn: H2Connection, body: bytes, *extra: tuple[bytes, bytes]) -> H2Stream:
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", HOST.encode()),
            (b":path", b"/pkg.Svc/Call"), *extra]  # fmt: skip
    stream = conn.open_stream(head)
    await stream.send_data(body, end_stream=True)
    return stream


async def _answer(stream: H2Stream) -> tuple[bytes, bytes]:
    head = dict(await stream.wait_headers())
    body = b""
    while chunk := await stream.receive_data():
        body += chunk
    return head[b":status"], body


async def test_a_draining_proxy_finishes_the_streams_under_way_and_refuses_new_ones() -> None:
    async with running(app_snapshot(replicas=1), [H2Backend("a", slow_answer)]) as r:
        transport = await trio.open_tcp_stream("127.0.0.1", r.port)
        conn = H2Connection(transport, client=True)
        closed = trio.Event()

        async def run() -> None:
            await conn.run()
            closed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            under_way = await _request(conn, b"one", (b"x-sleep", b"0.5"))
            await trio.sleep(0.1)  # the proxy has the request
            r.proxy.drain()
            with trio.fail_after(5):
                assert await _answer(under_way) == (b"200", b"a after one")
            assert conn.goaway
            assert not conn.accepts_streams()
            with pytest.raises(StreamReset) as refused:
                await _request(conn, b"two")
            assert refused.value.refused  # safe to retry on a new connection
            under_way.close()
            with trio.fail_after(5):
                await closed.wait()  # the proxy closed once nothing was left
            nursery.cancel_scope.cancel()
    assert [log.code for log in r.logs] == [200]


async def test_an_upstream_at_its_max_connection_age_loses_no_stream() -> None:
    """The backend GOAWAYs while answering: the answer still arrives whole, and the next
    request goes on a new upstream connection."""
    async with running(app_snapshot(replicas=1), [H2Backend("a", aged_out)]) as r:
        transport = await trio.open_tcp_stream("127.0.0.1", r.port)
        conn = H2Connection(transport, client=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            with trio.fail_after(10):
                for body in (b"one", b"two", b"three"):
                    stream = await _request(conn, body)
                    assert await _answer(stream) == (b"200", b"a after " + body)
                    assert dict(stream.trailers or []) == {b"grpc-status": b"0"}
                    stream.close()
            nursery.cancel_scope.cancel()
    assert r.backends["10.0.0.1"].connections == 3  # each GOAWAY moved the next request on
    assert [log.code for log in r.logs] == [200, 200, 200]


def refusing(times: int):  # type: ignore[no-untyped-def]
    """A backend handler that refuses its first `times` streams (REFUSED_STREAM: never
    processed, as a draining server's answer to a stream that crossed its GOAWAY)."""
    seen = 0

    async def handle(backend: H2Backend, stream: H2Stream, headers, body) -> None:  # type: ignore[no-untyped-def]
        nonlocal seen
        seen += 1
        if seen <= times:
            stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        await slow_answer(backend, stream, headers, body)

    return handle


@pytest.mark.parametrize(
    ("retry_on", "codes"),
    [(None, [200]), ("connect-failure", [503])],
    ids=["istio-default", "without-refused-stream"],
)
async def test_a_stream_refused_twice_is_retried_under_refused_stream(
    retry_on: str | None, codes: list[int]
) -> None:
    """A refusal gets one uncounted retry at once; a second one (a restart's race: the retry
    met another draining connection) is a retry under `retryOn: refused-stream`, which
    Istio's default policy holds, and not under a policy without it."""
    extra = []
    if retry_on is not None:
        retries = {"attempts": 2, "retryOn": retry_on}
        extra.append(vs([{"retries": retries, "route": [{"destination": {"host": "app"}}]}]))
    backend = H2Backend("a", refusing(2))
    async with running(app_snapshot(*extra, replicas=1), [backend]) as r:
        transport = await trio.open_tcp_stream("127.0.0.1", r.port)
        conn = H2Connection(transport, client=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            with trio.fail_after(10):
                stream = await _request(conn, b"one")
                status, body = await _answer(stream)
            nursery.cancel_scope.cancel()
    assert [log.code for log in r.logs] == codes
    assert len(backend.seen) == (3 if codes == [200] else 2)
    assert status == str(codes[0]).encode()
    if codes == [200]:
        assert body == b"a after one"
        assert r.logs[0].attempts == 2  # the uncounted retry, then one under the policy
    else:
        assert r.logs[0].flags == ["UR"]  # Envoy's upstream reset
