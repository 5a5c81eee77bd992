"""Moving one HTTP/2 exchange's bodies between two streams, as they come: the request's DATA and
trailers up (`pump_request`), the response's head, DATA and trailers down (`relay_response`).
Nothing is buffered beyond a chunk: `H2Stream` gives a chunk's flow-control window back only
when it is read, so each side moves at the pace of the slower peer.
"""

from __future__ import annotations

from nodeagent.http import flags
from nodeagent.http.headers import HOP_BY_HOP
from nodeagent.http.log import RequestLog, log
from nodeagent.http2.conn import H2Stream, Headers, StreamReset
from nodeagent.http2.messages import grpc_status_of
from nodeagent.http2.streams import ClientStream, UpstreamStream


async def pump_request(down: H2Stream, up: H2Stream) -> None:
    """The client's DATA to `up` as it comes, then its trailers (or END_STREAM). A reset of
    either side stops it quietly: the response side sees it too and decides."""
    try:
        while data := await down.receive_data():
            # The last chunk carries END_STREAM (no empty DATA frame after it).
            await up.send_data(data, end_stream=down.ended and not down.trailers)
        if down.trailers:
            up.send_trailers(down.trailers)
        else:
            up.end()
    except StreamReset:
        pass


async def relay_response(
    up: UpstreamStream, down: ClientStream, head: Headers, entry: RequestLog
) -> None:
    """Send `head` (the upstream's response head as the client gets it), then the upstream's
    DATA and trailers; `entry.grpc_status` from the trailers (or the trailers-only head). An
    upstream reset mid-body resets the client's stream (flag UR)."""
    assert up.headers is not None
    if up.ended and up.trailers is None:
        entry.grpc_status = grpc_status_of(up.headers)  # trailers-only (or no body)
        down.send_headers(head, end_stream=True)
        return
    down.send_headers(head)
    try:
        while data := await up.receive_data():
            await down.send_data(data)
    except StreamReset as exc:
        if down.error:
            raise
        entry.flags.append(flags.UPSTREAM_RESET)
        log.debug("request.upstream_reset", path=entry.path, error=str(exc))
        down.reset()
        return
    trailers = up.trailers
    if trailers is not None:
        entry.grpc_status = grpc_status_of(trailers)
        down.send_trailers([(k, v) for k, v in trailers if k.decode() not in HOP_BY_HOP])
    else:
        down.end()
