"""Traffic mirroring: a copy of a (fully buffered) request goes to the route's mirror, with
`-shadow` appended to its host as Envoy does; the answer is read and dropped, never waited for
by the client."""

from __future__ import annotations

import h11
import trio

from nodeagent.balance import NoHealthyUpstream, Registry
from nodeagent.http.errors import UpstreamOverflow
from nodeagent.http.pool import ConnectionPool
from nodeagent.routing import RouteDestination
from nodeagent.snapshot.snapshot import Snapshot


def shadow_head(head: h11.Request) -> h11.Request:
    """The mirrored copy's head: the same request, host `<host>-shadow`."""
    host = next((v.decode() for k, v in head.headers if k == b"host"), "")
    shadow_host = host.split(":", 1)[0] + "-shadow"
    headers = [(k, v) for k, v in head.headers if k != b"host"]
    return h11.Request(
        method=head.method, target=head.target, headers=[(b"host", shadow_host.encode()), *headers]
    )


async def mirror(
    pool: ConnectionPool,
    registry: Registry,
    snapshot: Snapshot,
    dest: RouteDestination,
    head: h11.Request,
    chunks: list[bytes],
) -> bool:
    """Send the copy; returns whether it was sent (False: no endpoint, no connection). The
    caller bounds it in time (`Limits.mirror_timeout`)."""
    if dest.service is None or dest.port is None or dest.error:
        return False
    cluster = registry.picker_for(snapshot, dest.service, dest.subset, dest.port)
    try:
        # Picked without start()/finish(): a mirror's answer is no feedback for the balancer.
        endpoint = cluster.pick().endpoint
    except NoHealthyUpstream:
        return False
    try:
        up = await pool.acquire(
            endpoint,
            dest.port,
            fresh=True,
            tls=cluster.policy.tls,  # a TLS-originated cluster gets its copy over TLS too
            host=cluster.cluster.rsplit("|", 1)[-1],
        )
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, UpstreamOverflow):
        return False
    try:
        await up.send(shadow_head(head))
        for chunk in chunks:
            await up.send(h11.Data(data=chunk))
        await up.send(h11.EndOfMessage())
        while not isinstance(await up.next_event(), h11.EndOfMessage | h11.ConnectionClosed):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
        pass
    finally:
        await pool.discard(up)
    return True
