"""Streaming the upstream's response to the client, and splicing the two after a 101 Upgrade.

The head and every body event h11 already holds go out in one write; the batch is flushed only
before waiting for the upstream (a small answer is one client write). A response that breaks off
after its head was sent can only be signalled by closing (flag UR); a client that goes away
while its response streams is flag DC. The upstream connection goes back to the pool only after
a clean, complete exchange.
"""

from __future__ import annotations

import h11
import trio

from nodeagent.http import flags
from nodeagent.http.downstream import Downstream
from nodeagent.http.headers import response_head, response_headers
from nodeagent.http.log import RequestLog
from nodeagent.http.pool import ConnectionPool, UpstreamConnection
from nodeagent.routing import HttpRequest, RouteDecision


async def stream_response(
    pool: ConnectionPool,
    down: Downstream,
    up: UpstreamConnection,
    response: h11.Response | h11.InformationalResponse,
    request: HttpRequest,
    decision: RouteDecision,
    entry: RequestLog,
    *,
    upgrade: bool,
) -> bool:
    """Pass `response` and its body on; returns whether the client connection can be kept."""
    entry.code = response.status_code
    if response.status_code == 101 and upgrade:
        hdrs = response_headers(response, decision.response_headers)
        hdrs += [("connection", "upgrade"), ("upgrade", request.headers.get("upgrade", ""))]
        entry.bytes_sent += await down.send(
            h11.InformationalResponse(status_code=101, headers=hdrs, reason=response.reason)
        )
        await splice(pool, down, up, entry)
        return False
    close = down.conn.their_state is not h11.DONE and not down.body_done()
    out: list[bytes] = []

    def queue(event: h11.Event) -> None:
        data = down.conn.send(event)
        if data:
            out.append(data)
            entry.bytes_sent += len(data)

    async def flush() -> None:
        if out:
            data = b"".join(out)
            out.clear()
            await down.io.send_all(data)

    try:
        if isinstance(response, h11.Response):
            queue(response_head(response, decision.response_headers, close=down.drain.on))
        else:  # a 101 the client did not ask for: h11 refuses it (flag DC, as before)
            hdrs = response_headers(response, decision.response_headers)
            queue(h11.Response(status_code=response.status_code, headers=hdrs))
        while True:
            event: object = None
            try:
                event = up.buffered_event()
            except h11.ProtocolError:
                event = None
            if event is h11.NEED_DATA:
                await flush()  # outside the upstream's try: a client failure is DC
                try:
                    event = await up.next_event()
                except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                    event = None
            if isinstance(event, h11.Data):
                queue(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                queue(h11.EndOfMessage())
                await flush()
                break
            else:
                # Headers are out (or about to be): closing is the only way to signal it.
                entry.flags.append(flags.UPSTREAM_RESET)
                await flush()
                await pool.discard(up)
                return False
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        entry.flags.append(flags.DOWNSTREAM_TERMINATION)
        await pool.discard(up)
        return False
    except trio.Cancelled:
        await pool.discard(up)
        raise
    await pool.release(up)
    return not close and down.conn.our_state is h11.DONE and down.conn.their_state is h11.DONE


async def splice(
    pool: ConnectionPool, down: Downstream, up: UpstreamConnection, entry: RequestLog
) -> None:
    """After a 101: raw bytes both ways until both sides are done."""
    client_rest, _ = down.conn.trailing_data
    upstream_rest, _ = up.conn.trailing_data
    read_size = down.limits.read_size

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, first: bytes, out: bool) -> None:
        try:
            if first:
                await dst.send_all(first)
            while True:
                data = await src.receive_some(read_size)
                if not data:
                    break
                if out:
                    entry.bytes_sent += len(data)
                await dst.send_all(data)
            if isinstance(dst, trio.SocketStream):
                await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, down.stream, up.stream, bytes(client_rest), False)
            nursery.start_soon(pump, up.stream, down.stream, bytes(upstream_rest), True)
    finally:
        await pool.discard(up)
