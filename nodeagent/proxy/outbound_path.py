"""The outbound path (15001): an app's captured connection, handed to the pod's L7 proxies for an
HTTP service port (HTTP/1.1 or HTTP/2, the client's codec sniffed, the upstream's the port's:
`http2.selection`), otherwise routed at L4 (`outbound.outbound_decision`) and carried through
the mTLS tunnel to a meshed workload (fail closed without the pod's certificate) or passed through.

`L4Feedback` brackets an L4 connection for the balancer (connection slot, in-flight count,
connect latency and outcome for outlier detection).
"""

from __future__ import annotations

import time
from typing import Any

import trio

from nodeagent.balance import Outcome, Overflow
from nodeagent.balance.pool import ConnectionToken
from nodeagent.balance.state import EndpointState
from nodeagent.http import HttpProxy, RequestLog
from nodeagent.http2.proxy import H2Proxy
from nodeagent.http2.selection import upstream_codec
from nodeagent.http2.sniff import Sniffed, classify_declared, sniff
from nodeagent.inpod import original_dst
from nodeagent.log import get_logger
from nodeagent.proxy import self_call
from nodeagent.proxy.connection import IDLE_TIMEOUT, ConnLog, Denied, SelfCall
from nodeagent.proxy.connector import MeshConnector, denied_by_policy
from nodeagent.proxy.outbound import (
    Passthrough,
    Refuse,
    ToWorkload,
    l7_target,
    outbound_decision,
)
from nodeagent.proxy.pod_core import PodCore
from nodeagent.proxy.relay import RelayResult, relay
from nodeagent.routing import HttpRequest, Source
from nodeagent.snapshot import L7Protocol, Snapshot, Workload
from nodeagent.telemetry.dataplane import TcpRecorder, record_request, service_of
from nodeagent.telemetry.metrics import SecurityPolicy
from nodeagent.tunnel import ConnectRequest, SourceInfo, TunnelError

log = get_logger("proxy")
# On a declared HTTP port (HTTP/1.1 or HTTP/2): how long the client's first bytes may take to
# say h2 or HTTP/1.1 (then HTTP/1.1, whose own head timeouts apply).
H2_SNIFF_TIMEOUT = 10.0
# On a port whose protocol is not declared: how long to wait for the client's first bytes
# before treating the connection as opaque TCP (a server-first protocol, where the client waits
# for the server's greeting, is delayed by this once per connection).
SNIFF_TIMEOUT = 0.1


async def _speaks(client: trio.SocketStream, declared: L7Protocol) -> Sniffed:
    """What the connection speaks: on a declared HTTP or HTTP/2 port, h2 (prior knowledge)
    or else HTTP/1.1 (Envoy's codec AUTO); undeclared: sniffed (h2, HTTP/1.x or TCP)."""
    if declared is L7Protocol.HTTP1 or declared is L7Protocol.HTTP2:
        got = await sniff(client.socket, H2_SNIFF_TIMEOUT, classify_declared)
        return "h2" if got == "h2" else "http1"
    return await sniff(client.socket, SNIFF_TIMEOUT)


class OutboundPath:
    """Serves one pod's 15001 connections (the L7 hand-off included), over the pod's core."""

    def __init__(self, core: PodCore) -> None:
        self.core = core
        self._http: HttpProxy | None = None  # made on the first HTTP connection
        self.http2 = H2Proxy(
            snapshot=core.snapshot,
            source=self._route_source,
            connector=self._connector(),
            registry=core.registry,
            on_request=self._on_request,
            limits=core.http_limits,
            name=f"http2:{core.pod}",
            access_logged=core.telemetry is not None,
            tracer=core.telemetry.tracer if core.telemetry is not None else None,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The HTTP/2 proxy's pooled upstream connections live here (the pod's nursery)."""
        await self.http2.run(task_status=task_status)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        await self.http2.aclose()

    def _connector(self) -> MeshConnector:
        return MeshConnector(
            netns=self.core.netns,
            identities=self.core.identities,
            source=self._tunnel_source,
            pool=self.core.pool,
            identity_wait=self.core.identity_wait,
            stats=self.core.stats.outbound,
            label=self.core.pod,
        )

    def drain(self) -> None:
        """The agent drains: the HTTP/1.1 proxy (if one was made) closes keep-alive connections
        after their next response, the HTTP/2 proxy sends its clients a graceful GOAWAY."""
        if self._http is not None:
            self._http.drain()
        self.http2.drain()

    def http_proxy(self) -> HttpProxy:
        """This pod's L7 proxy (one per pod, so upstream connections are pooled per source)."""
        if self._http is None:
            connector = self._connector()
            self._http = HttpProxy(
                snapshot=self.core.snapshot,
                source=self._route_source,
                connector=connector,
                registry=self.core.registry,
                on_request=self._on_request,
                limits=self.core.http_limits,
                name=f"http:{self.core.pod}",
                tracer=self.core.telemetry.tracer if self.core.telemetry is not None else None,
                access_logged=self.core.telemetry is not None,  # record_request writes the line
                bridge=self.http2.http1_bridge,  # a route to an HTTP/2 port's service
            )
        return self._http

    def _route_source(self, request: HttpRequest) -> Source:
        me = self.core.me(self.core.snapshot())
        if me is None:
            return Source()
        return Source(namespace=me.namespace, labels=me.labels)

    def _tunnel_source(self) -> SourceInfo | None:
        me = self.core.me(self.core.snapshot())
        if me is None or not me.identity:
            return None
        return SourceInfo(me.namespace, me.name, me.identity, me.address or "")

    def _on_request(self, entry: RequestLog) -> None:
        self.core.stats.outbound.bytes_sent += entry.bytes_received
        self.core.stats.outbound.bytes_received += entry.bytes_sent
        if self.core.telemetry is not None:
            snap = self.core.snapshot()
            me = self.core.me(snap)
            record_request(
                self.core.telemetry,
                snap,
                entry,
                source=me,
                namespace=me.namespace if me is not None else "-",
            )

    # -- outbound (15001) ------------------------------------------------------------------------

    async def serve(self, client: trio.SocketStream, conn: ConnLog) -> None:
        src = client.socket.getpeername()
        dst = original_dst(client.socket)
        conn.src, conn.dst = f"{src[0]}:{src[1]}", f"{dst[0]}:{dst[1]}"
        loop = self_call.unredirected(dst, client.socket.getsockname())
        if loop is not None:
            raise SelfCall(loop, dst[1])
        snap = self.core.snapshot()
        target = l7_target(snap, dst[0], dst[1])
        speaks = "tcp" if target is None else await _speaks(client, target.port.l7_protocol)
        if target is not None and speaks != "tcp":
            # An HTTP service port (or an undeclared one whose client spoke HTTP): an L7 proxy
            # routes every request (one log line each).
            conn.service, conn.flag = target.service.ref, "http" if speaks == "http1" else "http2"
            where = {"port": dst[1], "host": target.service.hostname, "client_address": src[0]}
            if speaks == "h2":
                await self.http2.serve(client, **where)  # per request, h2 or HTTP/1.1 upstream
            elif upstream_codec(target.port, "http1") == "h2":
                await self.http2.serve_http1(client, **where)  # HTTP/1.1 → HTTP/2
            else:
                await self.http_proxy().serve(client, **where)
            return
        me = self.core.me(snap)
        source = Source(me.namespace, me.labels) if me is not None else None
        decision = outbound_decision(
            snap,
            dst[0],
            dst[1],
            registry=self.core.registry,
            policy=self.core.outbound_policy,
            source=source,
            source_ip=src[0],
        )
        if isinstance(decision, Refuse):
            conn.tel = self._outbound_recorder(snap, me, conn, None, None, "none")
            if decision.flag == self_call.FLAG:
                raise SelfCall(decision.reason, dst[1])
            raise Denied(decision.flag, decision.reason)
        # Connection-level balancing: in flight from connect to close, connect failures count
        # for outlier detection; tcp.maxConnections refuses the connection (flag UO).
        feedback = L4Feedback(decision.handle)
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
        conn: ConnLog,
        snap: Snapshot,
        me: Workload | None,
        src: Any,
        decision: ToWorkload | Passthrough,
        feedback: L4Feedback,
    ) -> None:
        conn.service = decision.service
        if isinstance(decision, Passthrough):
            conn.endpoint, conn.flag = f"{decision.address}:{decision.port}", "passthrough"
            conn.tel = self._outbound_recorder(snap, me, conn, None, decision.service, "none")
            upstream = await self.core.connect((decision.address, decision.port), None)
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
        if me is None or self.core.identities is None:
            raise TunnelError("no_identity", "this pod has no mesh identity: refusing plaintext")
        conn.src_identity = me.identity
        # A new pod's certificate may still be on its way: wait (bounded), then fail closed.
        await self.core.identities.wait_ready(me.identity, self.core.identity_wait)
        request = ConnectRequest(
            decision.address,
            decision.port,
            source=SourceInfo(me.namespace, me.name, me.identity, src[0]),
            client=f"{src[0]}:{src[1]}",
        )
        stream, info = await self.core.pool.open_stream(
            source_identity=me.identity, expected_identity=decision.identity, request=request
        )
        feedback.connected()
        conn.resumed = info.resumed
        conn.pooled = info.reused
        self.core.stats.outbound.mtls += 1
        conn.opened()
        conn.relay = RelayResult()
        await relay(client, stream, idle_timeout=IDLE_TIMEOUT, result=conn.relay)

    def _outbound_recorder(
        self,
        snap: Snapshot,
        me: Workload | None,
        conn: ConnLog,
        destination: Workload | None,
        service: str | None,
        policy: SecurityPolicy,
    ) -> TcpRecorder | None:
        if self.core.telemetry is None:
            return None
        return TcpRecorder(
            self.core.telemetry,
            reporter="source",
            namespace=me.namespace if me is not None else "-",
            source=me,
            destination=destination,
            service=service_of(snap, service),
            security_policy=policy,
            downstream=conn.src,
            upstream=conn.endpoint or conn.dst,
            connection_id=f"{self.core.pod}#{conn.cid}",
        )


class L4Feedback:
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
                raise Denied(got.flag, str(got))
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
