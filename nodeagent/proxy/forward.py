"""One enrolled pod's proxy: its three listeners and the three connection paths.

- Outbound (15001): the app's captured connection. A service port whose protocol is HTTP/1.1
  (`protocol_hint == "http"`) goes to the pod's `HttpProxy` (L7 routing by
  `nodeagent.routing.decide`, pooled upstreams opened by `MeshConnector`); any other port is
  routed at L4 (`outbound.decide`, with VirtualService `tcp` weights). A meshed workload is ALWAYS
  reached through the mTLS tunnel (the pod's own certificate is awaited, bounded, and without it
  the connection fails closed, never falls back to plaintext); a destination outside the mesh is
  passed through from the pod's netns (or refused under REGISTRY_ONLY).
- Inbound plaintext (15006): PeerAuthentication (STRICT refuses) and L4 authorization, then
  delivery to the app from inside the netns with the client's own IP as source.
- Tunnel (15008): mTLS with the pod's identity, the client's SPIFFE id verified and
  authorized, then the same transparent delivery to the port the header names.

Every connection ends with one structured log line (`<path>.complete`) carrying source,
destination, identities, endpoint, bytes, duration, result and, when denied, the policy; with a
`telemetry`, also Istio's metrics and an access-log line (`nodeagent.telemetry.dataplane`).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from nodeagent.balance import Outcome, Overflow
from nodeagent.balance.pool import ConnectionToken
from nodeagent.balance.state import EndpointState
from nodeagent.http import HttpProxy, RequestLog
from nodeagent.http.errors import UpstreamDenied
from nodeagent.identity.api import IdentityProvider, IdentityUnavailable
from nodeagent.inpod import Netns, PodListeners, original_dst
from nodeagent.log import get_logger
from nodeagent.proxy.inbound import (
    Closed,
    InboundDecision,
    LiveConnection,
    LiveConnections,
    Peer,
    PeerCheck,
    plaintext_decision,
    tunnel_decision,
)
from nodeagent.proxy.outbound import (
    EndpointPicker,
    OutboundPolicy,
    Passthrough,
    Refuse,
    RoundRobinPicker,
    ToWorkload,
    decide,
    http_target,
    route_picker,
)
from nodeagent.proxy.relay import RelayResult, relay
from nodeagent.routing import Request, Source
from nodeagent.snapshot import Endpoint, Snapshot, Workload
from nodeagent.telemetry.dataplane import (
    Sinks,
    TcpRecorder,
    peer_workload,
    record_request,
    service_for,
    service_of,
)
from nodeagent.telemetry.metrics import SecurityPolicy
from nodeagent.telemetry.tracing import CURRENT_TRACE, tunnel_headers, tunnel_trace
from nodeagent.telemetry.tracing import Endpoint as SpanEndpoint
from nodeagent.tunnel import (
    SessionCache,
    SourceInfo,
    TunnelError,
    TunnelRequest,
    TunnelResponse,
    accept_tunnel,
    detach,
    open_tunnel,
    respond,
)

log = get_logger("proxy.forward")
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 3600.0
IDENTITY_WAIT = 5.0  # how long a new pod's connection waits for its first certificate
# While inbound connections are open, how often the snapshot is looked at for a swap (when no
# `policy_changed()` poke comes first): a policy change reaches open connections within this.
POLICY_POLL = 0.5
_conn_ids = itertools.count(1)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


@dataclass(slots=True)
class DirectionStats:
    opened: int = 0
    closed: int = 0
    failed: int = 0
    denied: int = 0
    mtls: int = 0  # of `opened`, those that crossed the tunnel (15008 in, or tunneled out)
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(slots=True)
class PodProxyStats:
    outbound: DirectionStats = field(default_factory=DirectionStats)
    inbound: DirectionStats = field(default_factory=DirectionStats)  # 15006 and 15008


class _Denied(Exception):
    def __init__(self, flag: str, reason: str, policy: str | None = None) -> None:
        super().__init__(reason)
        self.flag = flag
        self.policy = policy


@dataclass(slots=True)
class _Conn:
    """What the one log line of a connection says; filled in as the connection progresses."""

    kind: str
    src: str = "?"
    dst: str = "?"
    endpoint: str | None = None
    src_identity: str | None = None
    dst_identity: str | None = None
    service: str | None = None
    result: str = "ok"
    flag: str | None = None
    policy: str | None = None
    error: str | None = None
    resumed: bool | None = None
    relay: RelayResult | None = None
    tel: TcpRecorder | None = None  # Istio metrics + access log, once both peers are known
    cid: int = field(default_factory=lambda: next(_conn_ids))
    started: float = field(default_factory=time.monotonic)

    def opened(self) -> None:
        """Bytes can flow now: count the connection as opened."""
        if self.tel is not None:
            self.tel.opened()


def _empty_snapshot() -> Snapshot:
    return Snapshot.empty()


class PodProxy:
    """Serves one pod's three listeners until cancelled."""

    def __init__(
        self,
        pod: str,
        netns: Netns,
        listeners: PodListeners,
        *,
        workload: Workload | None = None,
        identities: IdentityProvider | None = None,
        snapshot: Callable[[], Snapshot] = _empty_snapshot,
        picker: EndpointPicker | None = None,
        sessions: SessionCache | None = None,
        outbound_policy: OutboundPolicy = "ALLOW_ANY",
        identity_wait: float = IDENTITY_WAIT,
        telemetry: Sinks | None = None,
    ) -> None:
        self.pod = pod
        self.telemetry = telemetry
        self.netns = netns
        self.listeners = listeners
        self.workload = workload  # this pod, as enrolled (the snapshot's copy wins when present)
        self.identities = identities
        self.snapshot = snapshot
        self.picker = picker if picker is not None else RoundRobinPicker()
        self.sessions = sessions if sessions is not None else SessionCache()
        self.outbound_policy: OutboundPolicy = outbound_policy
        self.identity_wait = identity_wait
        self.stats = PodProxyStats()
        self._http: HttpProxy | None = None  # made on the first HTTP connection
        self.live = LiveConnections()  # open inbound connections, re-checked on policy changes
        self._policy_poke = trio.Event()

    def http_proxy(self) -> HttpProxy:
        """This pod's L7 proxy (one per pod, so upstream connections are pooled per source)."""
        if self._http is None:
            connector = MeshConnector(
                netns=self.netns,
                identities=self.identities,
                source=self._tunnel_source,
                sessions=self.sessions,
                identity_wait=self.identity_wait,
                stats=self.stats.outbound,
                label=self.pod,
            )
            self._http = HttpProxy(
                snapshot=self.snapshot,
                source=self._route_source,
                connector=connector,
                picker=route_picker(self.picker),
                on_request=self._on_request,
                name=f"http:{self.pod}",
                tracer=self.telemetry.tracer if self.telemetry is not None else None,
                access_logged=self.telemetry is not None,  # record_request writes the line
            )
        return self._http

    def _route_source(self, request: Request) -> Source:
        me = self._me(self.snapshot())
        if me is None:
            return Source()
        return Source(namespace=me.namespace, labels=me.labels)

    def _tunnel_source(self) -> SourceInfo | None:
        me = self._me(self.snapshot())
        if me is None or not me.identity:
            return None
        return SourceInfo(me.namespace, me.name, me.identity, me.address or "")

    def _on_request(self, entry: RequestLog) -> None:
        self.stats.outbound.bytes_sent += entry.bytes_received
        self.stats.outbound.bytes_received += entry.bytes_sent
        if self.telemetry is not None:
            snap = self.snapshot()
            me = self._me(snap)
            record_request(
                self.telemetry,
                snap,
                entry,
                source=me,
                namespace=me.namespace if me is not None else "-",
            )

    def statistics(self) -> dict[str, Any]:
        def d(s: DirectionStats) -> dict[str, int]:
            return {
                "opened": s.opened,
                "closed": s.closed,
                "failed": s.failed,
                "denied": s.denied,
                "mtls": s.mtls,
                "bytes_sent": s.bytes_sent,
                "bytes_received": s.bytes_received,
            }

        inbound = d(self.stats.inbound)
        inbound["closed_by_policy"] = self.live.closed_by_policy
        return {"outbound": d(self.stats.outbound), "inbound": inbound}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept, self.listeners.outbound, "outbound", nursery)
                nursery.start_soon(self._accept, self.listeners.inbound, "inbound", nursery)
                nursery.start_soon(self._accept, self.listeners.tunnel, "tunnel", nursery)
                nursery.start_soon(self._watch_policy)
                nursery.start_soon(self._watch_revocation)
                task_status.started()
        finally:
            for listener in (
                self.listeners.outbound,
                self.listeners.inbound,
                self.listeners.tunnel,
            ):
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            if self._http is not None:
                with trio.CancelScope(shield=True):
                    await self._http.aclose()

    async def _accept(
        self, listener: trio.SocketListener, kind: str, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                log.warning("accept.failed", pod=self.pod, listener=kind, error=str(exc))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve, stream, kind)

    def _me(self, snap: Snapshot) -> Workload | None:
        if self.workload is None:
            return None
        return snap.workload(self.workload.uid) or self.workload

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, client: trio.SocketStream, kind: str) -> None:
        conn = _Conn(kind)
        stats = self.stats.outbound if kind == "outbound" else self.stats.inbound
        stats.opened += 1
        if kind == "tunnel":
            stats.mtls += 1
        try:
            if kind == "outbound":
                await self._outbound(client, conn)
            elif kind == "inbound":
                await self._inbound(client, conn)
            else:
                await self._tunnel(client, conn)
        except _Denied as exc:
            stats.denied += 1
            conn.result, conn.flag, conn.policy = "denied", exc.flag, exc.policy
            conn.error = str(exc)
        except TunnelError as exc:
            stats.failed += 1
            conn.result, conn.flag, conn.error = "failed", exc.flag, exc.msg
        except (OSError, trio.TooSlowError, IdentityUnavailable) as exc:
            stats.failed += 1
            conn.result, conn.flag = "failed", type(exc).__name__
            conn.error = f"{conn.dst}: {exc or type(exc).__name__}"
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
            stats.closed += 1
            r = conn.relay
            if r is not None:
                stats.bytes_sent += r.sent
                stats.bytes_received += r.received
                if r.error and conn.result == "ok":
                    conn.result, conn.error = "reset", r.error
            if conn.tel is not None:
                result = "refused" if conn.flag == "outbound_refused" else conn.result
                # A flag that is already Envoy's (UH, UO from balancing) is reported as it is.
                envoy = conn.flag if conn.flag and conn.flag.isupper() else None
                conn.tel.closed(
                    to_upstream=r.sent if r else 0,
                    to_client=r.received if r else 0,
                    result=result,
                    flag=envoy if result != "ok" else None,
                )
            self._log(conn)

    def _log(self, conn: _Conn) -> None:
        r = conn.relay
        fields: dict[str, Any] = {
            "conn": conn.cid,
            "pod": self.pod,
            "src": conn.src,
            "dst": conn.dst,
            "src_identity": conn.src_identity,
            "dst_identity": conn.dst_identity,
            "endpoint": conn.endpoint,
            "service": conn.service,
            "sent": r.sent if r else 0,
            "received": r.received if r else 0,
            "duration_ms": round((time.monotonic() - conn.started) * 1000, 3),
            "result": conn.result,
        }
        for key in ("flag", "policy", "error", "resumed"):
            value = getattr(conn, key)
            if value is not None:
                fields[key] = value
        if conn.result == "ok":
            log.info(f"{conn.kind}.complete", **fields)
        else:
            log.warning(f"{conn.kind}.complete", **fields)

    # -- outbound (15001) ------------------------------------------------------------------------

    async def _outbound(self, client: trio.SocketStream, conn: _Conn) -> None:
        src = client.socket.getpeername()
        dst = original_dst(client.socket)
        conn.src, conn.dst = f"{src[0]}:{src[1]}", f"{dst[0]}:{dst[1]}"
        snap = self.snapshot()
        target = http_target(snap, dst[0], dst[1])
        if target is not None:
            # HTTP/1.1 service port: the L7 proxy routes every request (one log line each).
            conn.service, conn.flag = target.service.ref, "http"
            await self.http_proxy().serve(
                client, port=dst[1], host=target.service.hostname, client_address=src[0]
            )
            return
        me = self._me(snap)
        source = Source(me.namespace, me.labels) if me is not None else None
        decision = decide(
            snap,
            dst[0],
            dst[1],
            picker=self.picker,
            policy=self.outbound_policy,
            source=source,
            source_ip=src[0],
        )
        if isinstance(decision, Refuse):
            conn.tel = self._outbound_recorder(snap, me, conn, None, None, "none")
            raise _Denied(decision.flag, decision.reason)
        # Connection-level balancing: in flight from connect to close, connect failures count
        # for outlier detection; tcp.maxConnections refuses the connection (flag UO).
        feedback = _L4Feedback(decision.handle)
        try:
            await self._outbound_to(client, conn, snap, me, src, decision, feedback)
        except BaseException as exc:
            feedback.failed(exc)
            raise
        finally:
            feedback.end()

    async def _outbound_to(
        self,
        client: trio.SocketStream,
        conn: _Conn,
        snap: Snapshot,
        me: Workload | None,
        src: Any,
        decision: ToWorkload | Passthrough,
        feedback: _L4Feedback,
    ) -> None:
        conn.service = decision.service
        if isinstance(decision, Passthrough):
            conn.endpoint, conn.flag = f"{decision.address}:{decision.port}", "passthrough"
            conn.tel = self._outbound_recorder(snap, me, conn, None, decision.service, "none")
            upstream = await self._connect((decision.address, decision.port), None)
            feedback.connected()
            conn.opened()
            conn.relay = RelayResult()
            await relay(client, upstream, idle_timeout=IDLE_TIMEOUT, result=conn.relay)
            return
        assert isinstance(decision, ToWorkload)
        conn.endpoint = f"{decision.address}:{decision.port}"
        conn.dst_identity = decision.identity
        conn.tel = self._outbound_recorder(
            snap, me, conn, decision.workload, decision.service, "mutual_tls"
        )
        if decision.route is not None:
            conn.flag = f"route={decision.route}"
        if me is None or self.identities is None:
            raise TunnelError("no_identity", "this pod has no mesh identity: refusing plaintext")
        conn.src_identity = me.identity
        # A new pod's certificate may still be on its way: wait (bounded), then fail closed.
        await self.identities.wait_ready(me.identity, self.identity_wait)
        request = TunnelRequest(
            port=decision.port,
            source=SourceInfo(me.namespace, me.name, me.identity, src[0]),
            trace={"conn": f"{self.pod}#{conn.cid}"},
        )
        stream, info = await open_tunnel(
            netns=self.netns,
            identities=self.identities,
            source_identity=me.identity,
            address=decision.address,
            expected_identity=decision.identity,
            request=request,
            sessions=self.sessions,
            connect_timeout=CONNECT_TIMEOUT,
        )
        feedback.connected()
        conn.resumed = info.resumed
        self.stats.outbound.mtls += 1
        conn.opened()
        conn.relay = RelayResult()
        await relay(client, stream, idle_timeout=IDLE_TIMEOUT, result=conn.relay)

    # -- inbound plaintext (15006) ----------------------------------------------------------------

    async def _inbound(self, client: trio.SocketStream, conn: _Conn) -> None:
        src = client.socket.getpeername()
        dst = original_dst(client.socket)
        conn.src, conn.dst = f"{src[0]}:{src[1]}", f"{dst[0]}:{dst[1]}"
        snap = self.snapshot()
        me = self._me(snap)
        if me is not None:
            conn.dst_identity = me.identity
            decision = plaintext_decision(snap, me, src[0], dst[0], dst[1])
            if not decision.allowed:
                conn.tel = self._inbound_recorder(snap, me, conn, src[0], dst[1], None, "none")
                raise _Denied("inbound_denied", decision.reason, decision.policy)
            self._audit(conn, decision.audited)
        conn.endpoint = conn.dst
        conn.tel = self._inbound_recorder(snap, me, conn, src[0], dst[1], None, "none")
        upstream = await self._connect(dst, (src[0], 0))
        peer = Peer(src[0], dst[0], dst[1], src_port=src[1])
        await self._relay_live(conn, snap, peer, client, upstream, client.socket)

    # -- inbound mTLS (15008) ---------------------------------------------------------------------

    async def _tunnel(self, client: trio.SocketStream, conn: _Conn) -> None:
        raw = detach(client)
        try:
            peer = raw.getpeername()
            local = raw.getsockname()
        except OSError:
            raw.close()
            raise
        conn.src = f"{peer[0]}:{peer[1]}"
        snap = self.snapshot()
        me = self._me(snap)
        if me is None or self.identities is None:
            raw.close()
            raise TunnelError("no_identity", "this pod has no mesh identity: tunnel refused")
        conn.dst_identity = me.identity
        try:
            await self.identities.wait_ready(me.identity, self.identity_wait)
        except IdentityUnavailable:
            raw.close()
            raise
        accepted = await accept_tunnel(raw, identities=self.identities, identity=me.identity)
        stream = accepted.stream
        try:
            conn.src_identity = accepted.peer_identity
            conn.resumed = accepted.resumed
            port = accepted.request.port
            conn.dst = conn.endpoint = f"{local[0]}:{port}"
            conn.tel = self._inbound_recorder(
                snap, me, conn, peer[0], port, accepted.request, "mutual_tls"
            )
            decision = tunnel_decision(snap, me, peer[0], local[0], port, accepted.peer_identity)
            if not decision.allowed:
                await _try_respond(stream, TunnelResponse(403, decision.reason))
                raise _Denied("tunnel_denied", decision.reason, decision.policy)
            self._audit(conn, decision.audited)
            try:
                upstream = await self._connect((local[0], port), (peer[0], 0))
            except (OSError, trio.TooSlowError) as exc:
                await _try_respond(stream, TunnelResponse(502, f"connect {conn.dst}: {exc}"))
                raise
            try:
                await respond(stream, TunnelResponse(200))
                if accepted.early_data:
                    await upstream.send_all(accepted.early_data)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await upstream.aclose()
                raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        verified = Peer(
            peer[0], local[0], port, accepted.peer_identity, accepted.peer_certificate, peer[1]
        )
        await self._relay_live(conn, snap, verified, stream, upstream, stream.socket)

    # -- policy on open inbound connections (ztunnel's connection manager + policy watcher) ----

    def policy_changed(self) -> None:
        """Re-check open inbound connections now (a `SnapshotSync` swap listener may call this:
        it only sets an event). Without it, the watcher notices a swap within POLICY_POLL."""
        self._policy_poke.set()

    async def _relay_live(
        self,
        conn: _Conn,
        snap: Snapshot,
        peer: Peer,
        downstream: trio.abc.HalfCloseableStream,
        upstream: trio.abc.HalfCloseableStream,
        sock: Any,
    ) -> None:
        """Relay while registered: a policy change that denies the connection aborts it."""
        scope = trio.CancelScope()

        def close(decision: InboundDecision) -> None:
            # RST rather than FIN: the client (an upstream pool) sees a reset, not a clean end.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            scope.cancel()

        live = LiveConnection(conn.cid, peer, close)
        self.live.add(live)
        try:
            current = self.snapshot()
            me = self._me(current)
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
            raise _Denied("closed_by_policy", live.closed_by.reason, live.closed_by.policy)

    async def _watch_policy(self) -> None:
        seen = self.snapshot()
        while True:
            await self.live.wait_nonempty()  # an idle pod does not poll
            with trio.move_on_after(POLICY_POLL):
                await self._policy_poke.wait()
            self._policy_poke = trio.Event()
            snap = self.snapshot()
            if snap is seen:
                continue
            seen = snap
            self._sweep(snap, None)

    async def _watch_revocation(self) -> None:
        """Re-check open tunnels' peer certificates whenever the identity provider changes
        (the CRL among others): `peer_identity` refuses a revoked serial."""
        if self.identities is None:
            return
        peer_check = self.identities.peer_identity
        while True:
            await self.identities.wait_changed()
            if len(self.live):
                self._sweep(self.snapshot(), peer_check)

    def _sweep(self, snap: Snapshot, peer_check: PeerCheck | None) -> None:
        me = self._me(snap)
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
            pod=self.pod,
            src=f"{peer.src_ip}:{peer.src_port}",
            dst=f"{peer.dst_ip}:{peer.port}",
            src_identity=peer.identity,
            policy=closed.decision.policy,
            cause=closed.cause,
            reason=closed.decision.reason,
        )

    # -- telemetry ---------------------------------------------------------------------------

    def _outbound_recorder(
        self,
        snap: Snapshot,
        me: Workload | None,
        conn: _Conn,
        destination: Workload | None,
        service: str | None,
        policy: SecurityPolicy,
    ) -> TcpRecorder | None:
        if self.telemetry is None:
            return None
        return TcpRecorder(
            self.telemetry,
            reporter="source",
            namespace=me.namespace if me is not None else "-",
            source=me,
            destination=destination,
            service=service_of(snap, service),
            security_policy=policy,
            downstream=conn.src,
            upstream=conn.endpoint or conn.dst,
            connection_id=f"{self.pod}#{conn.cid}",
        )

    def _inbound_recorder(
        self,
        snap: Snapshot,
        me: Workload | None,
        conn: _Conn,
        peer_ip: str,
        port: int,
        request: TunnelRequest | None,
        policy: SecurityPolicy,
    ) -> TcpRecorder | None:
        """Reporter "destination"; through the tunnel, the verified peer identity is the source
        principal and a trace context in the header becomes a SERVER span."""
        if self.telemetry is None:
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
        headers = tunnel_headers(request.trace) if request is not None else None
        if headers is not None:
            span = self.telemetry.tracer.start(
                headers,
                kind="SERVER",
                name=f"inbound|{port}",
                local=SpanEndpoint(self.telemetry.tracer.service_name, me.address if me else None),
                remote=SpanEndpoint(None, peer_ip),
                tags={"peer.principal": conn.src_identity or "-", "component": "proxy"},
            )
        return TcpRecorder(
            self.telemetry,
            reporter="destination",
            namespace=me.namespace if me is not None else "-",
            source=source,
            destination=me,
            service=service_for(snap, me, port) if me is not None else None,
            security_policy=policy,
            source_principal=conn.src_identity,
            downstream=conn.src,
            upstream=conn.endpoint or conn.dst,
            connection_id=f"{self.pod}#{conn.cid}",
            span=span,
        )

    def _audit(self, conn: _Conn, audited: tuple[str, ...]) -> None:
        for policy in audited:
            log.info("authz.audit", conn=conn.cid, pod=self.pod, src=conn.src, policy=policy)

    async def _connect(
        self, dst: tuple[str, int], bind_to: tuple[str, int] | None
    ) -> trio.SocketStream:
        sock = self.netns.socket(
            socket.AF_INET, socket.SOCK_STREAM, transparent=bind_to is not None
        )
        tsock = trio.socket.from_stdlib_socket(sock)
        try:
            if bind_to is not None:
                await tsock.bind(bind_to)
            with trio.fail_after(CONNECT_TIMEOUT):
                await tsock.connect(dst)
        except BaseException:
            tsock.close()
            raise
        return trio.SocketStream(tsock)


class MeshConnector:
    """Opens the L7 proxy's upstream streams: the mTLS tunnel to a meshed endpoint (from `netns`,
    with the source identity's certificate, the endpoint workload's identity required), a plain
    TCP connection from `netns` to an endpoint outside the mesh.

    `source()` is who connects (None: no mesh identity, so meshed endpoints are refused rather
    than reached in plaintext). Failures are raised as OSError, which the HTTP proxy answers with
    503 UF (and may retry on another endpoint).
    """

    def __init__(
        self,
        *,
        netns: Netns,
        identities: IdentityProvider | None,
        source: Callable[[], SourceInfo | None],
        sessions: SessionCache,
        identity_wait: float = IDENTITY_WAIT,
        stats: DirectionStats | None = None,
        label: str = "",
        mark: int | None = None,
    ) -> None:
        self.netns = netns
        self.identities = identities
        self.source = source
        self.sessions = sessions
        self.identity_wait = identity_wait
        self.stats = stats
        self.label = label
        self.mark = mark

    async def __call__(self, endpoint: Endpoint, service_port: int) -> trio.abc.Stream:
        workload = endpoint.workload
        where = f"{endpoint.address}:{endpoint.port}"
        if workload is None or not workload.identity:
            return await self._plain(endpoint.address, endpoint.port)
        me = self.source()
        if me is None or self.identities is None:
            raise OSError(f"connect {where}: {self.label} has no mesh identity: no plaintext")
        try:
            await self.identities.wait_ready(me.identity, self.identity_wait)
            stream, _ = await open_tunnel(
                netns=self.netns,
                identities=self.identities,
                source_identity=me.identity,
                address=endpoint.address,
                expected_identity=workload.identity,
                request=TunnelRequest(
                    port=endpoint.port,
                    source=me,
                    # The request that opens this connection: its CLIENT span is the parent of
                    # the destination agent's SERVER span.
                    trace={"conn": f"{self.label}#http", **tunnel_trace(CURRENT_TRACE.get())},
                ),
                sessions=self.sessions,
                connect_timeout=CONNECT_TIMEOUT,
            )
        except TunnelError as exc:
            if denied_by_policy(exc):
                raise UpstreamDenied(
                    f"tunnel to {where} ({workload.identity}): {exc.msg}"
                ) from None
            raise OSError(f"tunnel to {where} ({workload.identity}): {exc.msg}") from None
        except IdentityUnavailable as exc:
            raise OSError(f"tunnel to {where}: no certificate for {me.identity}: {exc}") from None
        if self.stats is not None:
            self.stats.mtls += 1
        return stream

    async def _plain(self, address: str, port: int) -> trio.SocketStream:
        if self.mark is None:
            sock = self.netns.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            sock = self.netns.socket(socket.AF_INET, socket.SOCK_STREAM, mark=self.mark)
        tsock = trio.socket.from_stdlib_socket(sock)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await tsock.connect((address, port))
        except BaseException:
            tsock.close()
            raise
        return trio.SocketStream(tsock)


def denied_by_policy(exc: TunnelError) -> bool:
    """The destination's authorization policy refused the tunnel (its 403 status reply)."""
    return exc.denied


class _L4Feedback:
    """One L4 connection as the balancer sees it: the cluster's connection slot (Overflow →
    refused, flag UO), in flight from connect to close, the connect time as latency sample."""

    def __init__(self, handle: EndpointState | None) -> None:
        self.handle = handle
        self.token: ConnectionToken | None = None
        self.started = time.monotonic()
        self.connect_s: float | None = None
        self.outcome = Outcome.CANCELLED
        if handle is None:
            return
        if handle.picker is not None:
            got = handle.picker.breaker.try_acquire_connection()
            if isinstance(got, Overflow):
                raise _Denied(got.flag, str(got))
            self.token = got
        handle.start()

    def connected(self) -> None:
        self.connect_s = time.monotonic() - self.started
        self.outcome = Outcome.SUCCESS

    def failed(self, exc: BaseException) -> None:
        if self.connect_s is not None:
            return  # the connection was made: what happens later says nothing of the endpoint
        if isinstance(exc, TunnelError):
            if denied_by_policy(exc) or exc.flag == "no_identity":
                self.outcome = Outcome.CANCELLED  # policy or our own identity, not health
            elif "timeout" in exc.flag:
                self.outcome = Outcome.TIMEOUT
            else:
                self.outcome = Outcome.CONNECT_FAILURE
        elif isinstance(exc, trio.TooSlowError):
            self.outcome = Outcome.TIMEOUT
        elif isinstance(exc, OSError):
            self.outcome = Outcome.CONNECT_FAILURE

    def end(self) -> None:
        if self.handle is not None:
            elapsed = time.monotonic() - self.started
            self.handle.finish(
                self.connect_s if self.connect_s is not None else elapsed, self.outcome
            )
        if self.token is not None:
            self.token.release()


async def _try_respond(stream: Any, response: TunnelResponse) -> None:
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await respond(stream, response)
