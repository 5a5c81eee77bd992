"""A PASSTHROUGH server's connection: routed on SNI, its TLS bytes relayed untouched.

The decision is `routing.route_tls` (the `tls` routes of the VirtualServices bound to the
server's Gateway); the endpoint is picked by the cluster's balancer like any L4 connection
(`proxy.outbound_path.L4Feedback`: connection slot, in flight, connect time) and reached through
the gateway's connector (the mesh tunnel, with the gateway's identity). The ClientHello was only
peeked, so the destination reads the client's TLS from its first byte and answers with its own
certificate: the gateway never sees the plaintext.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from nodeagent.balance import NoHealthyUpstream, PickContext, Registry
from nodeagent.gateway.servers import ServerBinding
from nodeagent.http import Connector
from nodeagent.log import get_logger
from nodeagent.proxy.connection import IDLE_TIMEOUT, Denied
from nodeagent.proxy.outbound_path import L4Feedback
from nodeagent.proxy.relay import RelayResult, relay
from nodeagent.routing import Source, TlsRequest, route_tls
from nodeagent.snapshot.snapshot import Snapshot

log = get_logger("gateway.passthrough")


@dataclass(slots=True)
class PassthroughLog:
    """The one log line of a passed-through connection."""

    sni: str
    port: int
    peer: str | None
    route: str = ""
    upstream: str = ""
    flag: str = "-"  # Envoy's response flag: NR no route, UH no healthy upstream, UF connect
    sent: int = 0
    received: int = 0
    error: str = ""


async def pass_through(
    client: trio.SocketStream,
    *,
    binding: ServerBinding,
    sni: str,
    port: int,
    peer: str | None,
    snapshot: Callable[[], Snapshot],
    registry: Registry,
    connector: Connector,
    labels: dict[str, str],
) -> PassthroughLog:
    """Route and relay one connection until either side closes; closes `client`."""
    entry = PassthroughLog(sni=sni, port=port, peer=peer)
    started = time.monotonic()
    try:
        snap = snapshot()
        source = Source(namespace=binding.namespace, labels=labels, gateway=binding.gateway)
        decision = route_tls(snap, source, TlsRequest(sni, port))
        entry.route = decision.route_name
        dest = decision.chosen
        if dest is None or dest.service is None or dest.port is None or dest.error is not None:
            entry.flag = "NR"
            return entry
        cluster = registry.picker_for(
            snap, dest.service, dest.subset, dest.port, from_namespace=binding.namespace
        )
        try:
            handle = cluster.pick(PickContext(source_ip=peer))
        except NoHealthyUpstream:
            entry.flag = "UH"
            return entry
        entry.upstream = f"{handle.endpoint.address}:{handle.endpoint.port}"
        try:
            feedback = L4Feedback(handle)
        except Denied as exc:
            entry.flag, entry.error = exc.flag, str(exc)
            return entry
        try:
            try:
                upstream = await connector(handle.endpoint, dest.port)
            except OSError as exc:
                feedback.failed(exc)
                entry.flag, entry.error = "UF", str(exc)
                return entry
            feedback.connected()
            result = RelayResult()
            try:
                await relay(client, upstream, idle_timeout=IDLE_TIMEOUT, result=result)  # type: ignore[arg-type]
            finally:
                entry.sent, entry.received = result.sent, result.received
                entry.error = result.error
                with trio.CancelScope(shield=True):
                    await upstream.aclose()
        finally:
            feedback.end()
        return entry
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
        log.info(
            "gateway.passthrough",
            sni=entry.sni,
            port=entry.port,
            peer=entry.peer,
            route=entry.route,
            upstream=entry.upstream,
            flag=entry.flag,
            sent=entry.sent,
            received=entry.received,
            error=entry.error or None,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
