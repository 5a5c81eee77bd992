"""The inbound paths: plaintext 15006 (PeerAuthentication, then L4 authorization) and HBONE on
15008 (the client's SPIFFE id verified once per TLS connection, then every CONNECT stream
authorized on its own), both delivering to the app from inside the netns with the client's own
address as source.

Policy also applies to connections already open (ztunnel's connection manager and policy
watcher): each relayed connection is registered in `InboundPath.live` and re-checked when the
snapshot swaps (the agent's swap listener calls `policy_changed()`) or the identity provider
changes (revocation); one now denied is reset (RST_STREAM for a tunnel stream), and a tunnel
connection whose peer certificate is revoked is closed whole.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any

import trio

from nodeagent.http import RequestLog
from nodeagent.http.headers import xfcc_value
from nodeagent.http.inbound import InboundConnection, InboundHttp, Totals
from nodeagent.http2.inbound import InboundH2
from nodeagent.http2.sniff import sniff_stream
from nodeagent.identity.api import IdentityUnavailable, PeerRejected
from nodeagent.inpod import original_dst
from nodeagent.log import get_logger
from nodeagent.proxy import self_call
from nodeagent.proxy.connection import IDLE_TIMEOUT, ConnLog, Denied, SelfCall
from nodeagent.proxy.inbound import (
    Closed,
    InboundDecision,
    LiveConnection,
    LiveConnections,
    Peer,
    PeerCheck,
    parses_requests,
    plaintext_decision,
    tunnel_decision,
)
from nodeagent.proxy.l7_guard import workload_guard
from nodeagent.proxy.outbound import inbound_http_port
from nodeagent.proxy.pod_core import PodCore
from nodeagent.proxy.relay import RelayResult, relay
from nodeagent.snapshot import L7Protocol, Service, ServicePort, Snapshot, Workload
from nodeagent.telemetry.dataplane import (
    TcpRecorder,
    peer_workload,
    record_inbound_request,
    service_for,
)
from nodeagent.telemetry.metrics import SecurityPolicy
from nodeagent.telemetry.tracing import SpanEndpoint, tunnel_headers
from nodeagent.tunnel import (
    ConnectRequest,
    HboneConnection,
    HboneStream,
    TunnelError,
    accept_hbone,
    detach,
    hbone,
)
from nodeagent.tunnel.h2conn import StreamHandler

log = get_logger("proxy")

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST
# An HTTP/2 port's client (the source agent) speaks at once: its preface, or an HTTP/1.1
# request (a client without prior knowledge, Envoy's codec AUTO at the source).
H2_SNIFF_TIMEOUT = 10.0


class InboundPath:
    """Serves one pod's 15006 and 15008 connections over the pod's core, and re-checks them
    while open."""

    def __init__(self, core: PodCore) -> None:
        self.core = core
        self.live = LiveConnections()  # open inbound connections, re-checked on policy changes
        self.tunnels: set[HboneConnection] = set()  # open 15008 connections (revocation)
        self.draining = False
        self.tunnels_accepted = 0  # TLS connections accepted on 15008 (each carries streams)
        self._policy_poke = trio.Event()
        telemetry = core.telemetry
        # The pod's HTTP ports (destination mode): requests parsed, authorized, forwarded.
        guard = workload_guard(core.snapshot, core.me, core.authenticator)
        self.http = InboundHttp(
            guard=guard,
            limits=core.http_limits,
            tracer=telemetry.tracer if telemetry is not None else None,
            name=f"inbound:{core.pod}",
            access_logged=telemetry is not None,
        )
        # The pod's HTTP/2 and gRPC ports: the same, stream by stream.
        self.http2 = InboundH2(
            guard=guard,
            limits=core.http_limits,
            tracer=telemetry.tracer if telemetry is not None else None,
            name=f"inbound-h2:{core.pod}",
            access_logged=telemetry is not None,
        )

    def drain(self) -> None:
        """The agent drains (a graceful restart): every client is told to move on to the agent
        taking over — a graceful GOAWAY on each HBONE connection (source agents open their next
        streams elsewhere; those under way finish) and on each HTTP/2 client connection, and
        `connection: close` on HTTP/1.1's next response."""
        self.draining = True
        self.http.drain()
        self.http2.drain()
        for hconn in list(self.tunnels):
            hconn.drain()

    # -- inbound plaintext (15006) ----------------------------------------------------------------

    async def serve_plaintext(self, client: trio.SocketStream, conn: ConnLog) -> None:
        src = client.socket.getpeername()
        dst = original_dst(client.socket)
        conn.src, conn.dst = f"{src[0]}:{src[1]}", f"{dst[0]}:{dst[1]}"
        loop = self_call.inbound_target(dst)
        if loop is not None:
            raise SelfCall(loop, dst[1])
        snap = self.core.snapshot()
        me = self.core.me(snap)
        http_port = inbound_http_port(snap, me, dst[1]) if me is not None else None
        if me is not None and http_port is not None:
            conn.dst_identity = me.identity
            if snap.peer_authentication_for(me, dst[1]) == "STRICT":
                conn.tel = self._inbound_recorder(snap, me, conn, src[0], dst[1], None, "none")
                raise Denied("inbound_denied", "PeerAuthentication STRICT: plaintext refused")
            conn.endpoint = conn.dst
            conn.tel = self._inbound_recorder(snap, me, conn, src[0], dst[1], None, "none")
            upstream = await self.core.connect(dst, (src[0], 0))
            peer = Peer(src[0], dst[0], dst[1], src_port=src[1], http=True)
            reset = _linger_reset(client.socket)
            await self._serve_http(conn, snap, me, peer, client, upstream, None, reset, http_port)
            return
        if me is not None:
            conn.dst_identity = me.identity
            decision = plaintext_decision(snap, me, src[0], dst[0], dst[1])
            if not decision.allowed:
                conn.tel = self._inbound_recorder(snap, me, conn, src[0], dst[1], None, "none")
                raise Denied("inbound_denied", decision.reason, decision.policy)
            self.core.audit(conn, decision.audited)
        conn.endpoint = conn.dst
        conn.tel = self._inbound_recorder(snap, me, conn, src[0], dst[1], None, "none")
        upstream = await self.core.connect(dst, (src[0], 0))
        peer = Peer(src[0], dst[0], dst[1], src_port=src[1])
        await self._relay_live(conn, snap, peer, client, upstream, _linger_reset(client.socket))

    # -- inbound HBONE (15008) ------------------------------------------------------------------

    async def accept_tunnel(
        self, client: trio.SocketStream, conn: ConnLog
    ) -> tuple[HboneConnection, bool]:
        """The TLS handshake of one 15008 connection, the client's certificate verified: the
        connection (not yet serving) and whether its session resumed. Raises on refusal."""
        raw = detach(client)
        try:
            peer = raw.getpeername()
        except OSError:
            raw.close()
            raise
        conn.src = f"{peer[0]}:{peer[1]}"
        me = self.core.me(self.core.snapshot())
        if me is None or self.core.identities is None:
            raw.close()
            raise TunnelError("no_identity", "this pod has no mesh identity: tunnel refused")
        conn.dst_identity = me.identity
        try:
            await self.core.identities.wait_ready(me.identity, self.core.identity_wait)
        except IdentityUnavailable:
            raw.close()
            raise
        hconn, resumed = await accept_hbone(
            raw, identities=self.core.identities, identity=me.identity
        )
        conn.src_identity = hconn.peer_identity
        return hconn, resumed

    async def serve_tunnel(self, hconn: HboneConnection, run_stream: StreamHandler) -> None:
        """Serve an accepted connection's CONNECT streams (each through `run_stream`, which gives
        it its own log line and counters) until it closes; registered so that a revoked peer
        certificate closes the whole connection."""
        self.tunnels.add(hconn)
        self.tunnels_accepted += 1
        if self.draining:
            hconn.drain()
        try:
            await hconn.run(run_stream)
        finally:
            self.tunnels.discard(hconn)

    async def serve_stream(
        self, hconn: HboneConnection, stream: HboneStream, conn: ConnLog, resumed: bool
    ) -> None:
        """One CONNECT: parse, refuse a self call (400), authorize (401), connect to the app
        from the client's address (503 when it fails), answer 200 and relay."""
        tls = hconn.tls.socket
        peer, local = tls.getpeername(), tls.getsockname()
        conn.src = f"{peer[0]}:{peer[1]}"
        conn.src_identity = hconn.peer_identity
        conn.resumed = resumed
        snap = self.core.snapshot()
        me = self.core.me(snap)
        if me is None:
            await _try_status(stream, hbone.UNAVAILABLE)
            raise TunnelError("no_identity", "this pod has no mesh identity: tunnel refused")
        conn.dst_identity = me.identity
        try:
            request = hbone.parse_connect(stream.request_headers)
            if request.address != local[0]:
                raise hbone.HboneError(f":authority {request.authority} is not this pod")
        except hbone.HboneError as exc:
            await _try_status(stream, hbone.BAD_REQUEST)
            raise TunnelError("bad_request", f"CONNECT from {conn.src}: {exc}") from None
        port = request.port
        conn.dst = conn.endpoint = f"{local[0]}:{port}"
        loop = self_call.tunnel_target(port)
        if loop is not None:
            await _try_status(stream, hbone.BAD_REQUEST)
            raise SelfCall(loop, port)
        http_port = inbound_http_port(snap, me, port)
        deferred = http_port is not None and not parses_requests(
            snap, me, mode=self.core.destination_l7, source_reported=request.source_reported
        )
        if deferred:
            http_port = None  # the source reports its requests and no policy reads them: L4
        http = http_port is not None
        # An HTTP port's requests get SERVER spans of their own: the stream gets none.
        traced = None if http else request
        conn.tel = self._inbound_recorder(snap, me, conn, peer[0], port, traced, "mutual_tls")
        if not http:
            # On an HTTP port every request is authorized (L4 and L7 fields alike) when it is
            # parsed; here, at stream open, only L4 policy can be checked (L7 fields fail
            # closed).
            decision = tunnel_decision(snap, me, peer[0], local[0], port, hconn.peer_identity)
            if not decision.allowed:
                await _try_status(stream, hbone.DENIED)
                raise Denied("tunnel_denied", decision.reason, decision.policy)
            self.core.audit(conn, decision.audited)
        try:
            upstream = await self.core.connect((local[0], port), (peer[0], 0))
        except (OSError, trio.TooSlowError):
            await _try_status(stream, hbone.UNAVAILABLE)
            raise
        try:
            await stream.respond(hbone.OK)
        except BaseException:
            with trio.CancelScope(shield=True):
                await upstream.aclose()
            raise
        verified = Peer(
            peer[0],
            local[0],
            port,
            hconn.peer_identity,
            hconn.peer_certificate,
            peer[1],
            http,
            deferred_http=deferred,
        )
        if http_port is not None:
            await self._serve_http(
                conn, snap, me, verified, stream, upstream, request, stream.reset, http_port
            )
            return
        await self._relay_live(conn, snap, verified, stream, upstream, stream.reset)

    # -- inbound HTTP (an HTTP service port, after the tunnel or on 15006) -----------------------

    async def _serve_http(
        self,
        conn: ConnLog,
        snap: Snapshot,
        me: Workload,
        peer: Peer,
        client: trio.abc.Stream,
        upstream: trio.SocketStream,
        request: ConnectRequest | None,
        reset: Callable[[], None],
        service_port: ServicePort,
    ) -> None:
        """Parse the connection's requests (`nodeagent.http.inbound`; on an HTTP/2 port whose
        client sent the preface, its streams: `nodeagent.http2.inbound`): each authenticated and
        authorized on its own (`l7_guard`), then forwarded to the app over `upstream` (kept
        alive; a new one from the client's address when the app closed it). Registered while
        open: PeerAuthentication turning STRICT, or the peer's certificate revoked, aborts it
        with `reset` (authorization needs no re-check: it runs per request)."""
        first = [upstream]

        async def connect() -> trio.abc.Stream:
            if first:
                return first.pop()
            return await self.core.connect((peer.dst_ip, peer.port), (peer.src_ip, 0))

        xfcc = None
        if peer.identity is not None:
            xfcc = xfcc_value(me.identity, peer.identity, peer.certificate)
        service = service_for(snap, me, peer.port)
        on_request = None
        if self.core.telemetry is not None:
            on_request = self._request_recorder(snap, me, service, peer, request)
        span_host = service.hostname if service is not None else me.address
        inbound = InboundConnection(
            source_ip=peer.src_ip,
            source_port=peer.src_port,
            destination_ip=peer.dst_ip,
            port=peer.port,
            source_identity=peer.identity,
            connect=connect,
            on_request=on_request,
            xfcc=xfcc,
            span_name=f"{span_host}:{service_port.port}/*",  # Envoy's inbound decorator
        )
        scope = trio.CancelScope()

        def close(decision: InboundDecision) -> None:
            reset()
            scope.cancel()

        live = LiveConnection(conn.cid, peer, close)
        self.live.add(live)
        conn.opened()
        totals = Totals()
        try:
            current = self.core.snapshot()
            now = self.core.me(current)
            if current is not snap and now is not None:
                self._report_closed(self.live.check(live, current, now))
            with scope:
                server: InboundHttp | InboundH2 = self.http
                if service_port.l7_protocol is L7Protocol.HTTP2:
                    speaks, client = await sniff_stream(client, H2_SNIFF_TIMEOUT)
                    server = self.http2 if speaks == "h2" else self.http
                await server.serve(client, inbound, totals)
        finally:
            self.live.remove(live)
            conn.relay = RelayResult(sent=totals.received, received=totals.sent)
            for unused in first:
                with trio.CancelScope(shield=True):
                    await unused.aclose()
        if live.closed_by is not None:
            raise Denied("closed_by_policy", live.closed_by.reason, live.closed_by.policy)

    def _request_recorder(
        self,
        snap: Snapshot,
        me: Workload,
        service: Service | None,
        peer: Peer,
        request: ConnectRequest | None,
    ) -> Callable[[RequestLog], None]:
        """The reporter "destination" metrics and access log of each request on one
        connection (its peers known once, at accept)."""
        telemetry = self.core.telemetry
        assert telemetry is not None
        src = request.source if request is not None else None
        source = peer_workload(
            snap,
            peer.src_ip,
            identity=peer.identity or "",
            name=src.name if src else "",
            namespace=src.namespace if src else "",
        )
        policy: SecurityPolicy = "mutual_tls" if peer.identity is not None else "none"

        def record(entry: RequestLog) -> None:
            record_inbound_request(
                telemetry,
                entry,
                source=source,
                destination=me,
                service=service,
                source_principal=peer.identity,
                security_policy=policy,
            )

        return record

    # -- policy on open inbound connections (ztunnel's connection manager + policy watcher) ----

    def policy_changed(self) -> None:
        """Re-check open inbound connections against the current snapshot. The agent's
        `SnapshotSync` swap listener calls it on every swap; it only sets an event."""
        self._policy_poke.set()

    async def _relay_live(
        self,
        conn: ConnLog,
        snap: Snapshot,
        peer: Peer,
        downstream: trio.abc.HalfCloseableStream,
        upstream: trio.abc.HalfCloseableStream,
        reset: Callable[[], None],
    ) -> None:
        """Relay while registered: a policy change that denies the connection aborts it with
        `reset` (a TCP RST on 15006, RST_STREAM on 15008: the client, maybe an upstream pool,
        sees a reset, not a clean end)."""
        scope = trio.CancelScope()

        def close(decision: InboundDecision) -> None:
            reset()
            scope.cancel()

        live = LiveConnection(conn.cid, peer, close)
        self.live.add(live)
        try:
            current = self.core.snapshot()
            me = self.core.me(current)
            if current is not snap and me is not None:
                # A swap while this connection was being set up: the watcher may have swept
                # before it was registered.
                self._report_closed(self.live.check(live, current, me))
            conn.opened()
            conn.relay = RelayResult()
            with scope:
                await relay(downstream, upstream, idle_timeout=IDLE_TIMEOUT, result=conn.relay)
        finally:
            self.live.remove(live)
        if live.closed_by is not None:
            raise Denied("closed_by_policy", live.closed_by.reason, live.closed_by.policy)

    async def watch_policy(self) -> None:
        seen = self.core.snapshot()
        while True:
            await self._policy_poke.wait()
            self._policy_poke = trio.Event()
            snap = self.core.snapshot()
            if snap is seen:
                continue
            seen = snap
            if len(self.live):
                self._sweep(snap, None)

    async def watch_revocation(self) -> None:
        """Re-check open tunnels' peer certificates whenever the identity provider changes
        (the CRL among others): `peer_identity` refuses a revoked serial."""
        if self.core.identities is None:
            return
        peer_check = self.core.identities.peer_identity
        while True:
            await self.core.identities.wait_changed()
            if len(self.live):
                self._sweep(self.core.snapshot(), peer_check)
            for hconn in list(self.tunnels):
                # Its streams were closed (and logged) by the sweep; no new one may come.
                try:
                    peer_check(hconn.peer_certificate)
                except (PeerRejected, ValueError) as exc:
                    hconn.fail(f"peer certificate rejected: {exc}")

    def _sweep(self, snap: Snapshot, peer_check: PeerCheck | None) -> None:
        me = self.core.me(snap)
        if me is None:
            return
        for closed in self.live.sweep(snap, me, peer_check):
            self._report_closed(closed)

    def _report_closed(self, closed: Closed | None) -> None:
        if closed is None:
            return
        peer = closed.conn.peer
        log.warning(
            "connection.closed_by_policy",
            conn=closed.conn.cid,
            pod=self.core.pod,
            src=f"{peer.src_ip}:{peer.src_port}",
            dst=f"{peer.dst_ip}:{peer.port}",
            src_identity=peer.identity,
            policy=closed.decision.policy,
            cause=closed.cause,
            reason=closed.decision.reason,
        )

    def _inbound_recorder(
        self,
        snap: Snapshot,
        me: Workload | None,
        conn: ConnLog,
        peer_ip: str,
        port: int,
        request: ConnectRequest | None,
        policy: SecurityPolicy,
    ) -> TcpRecorder | None:
        """Reporter "destination"; through the tunnel, the verified peer identity is the source
        principal and a trace context in the header becomes a SERVER span."""
        if self.core.telemetry is None:
            return None
        src = request.source if request is not None else None
        source = peer_workload(
            snap,
            peer_ip,
            identity=conn.src_identity or "",
            name=src.name if src else "",
            namespace=src.namespace if src else "",
        )
        span = None
        headers = tunnel_headers(request.trace_map()) if request is not None else None
        if headers is not None:
            tracer = self.core.telemetry.tracer
            span = tracer.start(
                headers,
                kind="SERVER",
                name=f"inbound|{port}",
                local=SpanEndpoint(tracer.service_name, me.address if me else None),
                remote=SpanEndpoint(None, peer_ip),
                tags={"peer.principal": conn.src_identity or "-", "component": "proxy"},
            )
        return TcpRecorder(
            self.core.telemetry,
            reporter="destination",
            namespace=me.namespace if me is not None else "-",
            source=source,
            destination=me,
            service=service_for(snap, me, port) if me is not None else None,
            security_policy=policy,
            source_principal=conn.src_identity,
            downstream=conn.src,
            upstream=conn.endpoint or conn.dst,
            connection_id=f"{self.core.pod}#{conn.cid}",
            span=span,
        )


def _linger_reset(sock: Any) -> Callable[[], None]:
    def reset() -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

    return reset


async def _try_status(stream: HboneStream, status: int) -> None:
    """A refusal status, best effort: the client may already be gone."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.respond(status)
