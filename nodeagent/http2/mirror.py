"""HTTP/2 traffic mirroring: a copy of a (fully buffered) request goes to the route's mirror on
a pooled upstream connection (in the codec the mirror's port declares: `selection.py`),
`:authority` with `-shadow` appended to its host as Envoy does; the answer is read and dropped,
never waited for by the client (`H2Pool.spawn` runs it)."""

from __future__ import annotations

import trio

from nodeagent.balance import NoHealthyUpstream, Registry
from nodeagent.http.errors import UpstreamDenied, UpstreamOverflow
from nodeagent.http.origination import UpstreamTlsError
from nodeagent.http2.conn import Headers, StreamReset
from nodeagent.http2.streams import RequestFacts, Upstreams
from nodeagent.routing import RouteDestination
from nodeagent.snapshot.snapshot import Snapshot


def shadow_headers(headers: Headers) -> Headers:
    """The copy's head: the same request, `:authority` `<host>-shadow`."""
    out: Headers = []
    for k, v in headers:
        if k == b":authority":
            v = v.split(b":", 1)[0] + b"-shadow"
        out.append((k, v))
    return out


async def mirror(
    upstreams: Upstreams,
    registry: Registry,
    snapshot: Snapshot,
    dest: RouteDestination,
    headers: Headers,
    chunks: list[bytes],
) -> bool:
    """Send the copy; whether it was sent (False: no endpoint, no connection). The caller
    bounds it in time (`Limits.mirror_timeout`)."""
    if dest.service is None or dest.port is None or dest.error:
        return False
    cluster = registry.picker_for(snapshot, dest.service, dest.subset, dest.port)
    try:
        # Picked without start()/finish(): a mirror's answer is no feedback for the balancer.
        endpoint = cluster.pick().endpoint
    except NoHealthyUpstream:
        return False
    facts = RequestFacts(end_stream=not chunks, content_length=None)
    try:
        opened = await upstreams.open(endpoint, dest.port, shadow_headers(headers), facts, cluster)
    except (
        OSError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        UpstreamDenied,
        UpstreamOverflow,
        UpstreamTlsError,
        StreamReset,
    ):
        return False
    up = opened.stream
    try:
        for chunk in chunks:
            await up.send_data(chunk)
        if chunks:
            await up.finish(None)
        await up.wait_headers()
        while await up.receive_data():
            pass
    except StreamReset:
        pass
    finally:
        await up.aclose()
    return True
