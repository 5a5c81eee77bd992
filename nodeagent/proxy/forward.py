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
destination, identities, endpoint, bytes, duration, result and, when denied, the policy.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from nodeagent.http import HttpProxy, RequestLog
from nodeagent.identity.api import IdentityProvider, IdentityUnavailable
from nodeagent.inpod import Netns, PodListeners, original_dst
from nodeagent.log import get_logger
from nodeagent.proxy.inbound import plaintext_decision, tunnel_decision
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
_conn_ids = itertools.count(1)


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
    cid: int = field(default_factory=lambda: next(_conn_ids))
    started: float = field(default_factory=time.monotonic)


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
    ) -> None:
        self.pod = pod
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

        return {"outbound": d(self.stats.outbound), "inbound": d(self.stats.inbound)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept, self.listeners.outbound, "outbound", nursery)
                nursery.start_soon(self._accept, self.listeners.inbound, "inbound", nursery)
                nursery.start_soon(self._accept, self.listeners.tunnel, "tunnel", nursery)
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
        )
        if isinstance(decision, Refuse):
            raise _Denied("outbound_refused", decision.reason)
        conn.service = decision.service
        if isinstance(decision, Passthrough):
            conn.endpoint, conn.flag = f"{decision.address}:{decision.port}", "passthrough"
            upstream = await self._connect((decision.address, decision.port), None)
            conn.relay = RelayResult()
            await relay(client, upstream, idle_timeout=IDLE_TIMEOUT, result=conn.relay)
            return
        assert isinstance(decision, ToWorkload)
        conn.endpoint = f"{decision.address}:{decision.port}"
        conn.dst_identity = decision.identity
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
        conn.resumed = info.resumed
        self.stats.outbound.mtls += 1
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
                raise _Denied("inbound_denied", decision.reason, decision.policy)
            self._audit(conn, decision.audited)
        conn.endpoint = conn.dst
        upstream = await self._connect(dst, (src[0], 0))
        conn.relay = RelayResult()
        await relay(client, upstream, idle_timeout=IDLE_TIMEOUT, result=conn.relay)

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
        conn.relay = RelayResult()
        await relay(stream, upstream, idle_timeout=IDLE_TIMEOUT, result=conn.relay)

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
                    port=endpoint.port, source=me, trace={"conn": f"{self.label}#http"}
                ),
                sessions=self.sessions,
                connect_timeout=CONNECT_TIMEOUT,
            )
        except TunnelError as exc:
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


async def _try_respond(stream: Any, response: TunnelResponse) -> None:
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await respond(stream, response)
