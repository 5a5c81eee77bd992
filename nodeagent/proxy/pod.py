"""`PodProxy`: one enrolled pod's proxy, its three listeners and the accept loops that hand each
connection to its path, the one structured log line per connection, and the counters the admin
socket shows (`statistics()`). It builds the pod's `PodCore` and composes an `OutboundPath` and
an `InboundPath` over it (explicit objects, no shared `self`).

- Outbound (15001, `outbound_path`): a service port whose protocol is HTTP/1.1 goes to the pod's
  `HttpProxy` (L7 routing, pooled upstreams opened by `connector.MeshConnector`); any other port
  is routed at L4. A meshed workload is ALWAYS reached through the mTLS tunnel (fail closed
  without the pod's certificate); a destination outside the mesh is passed through from the
  pod's netns (or refused under REGISTRY_ONLY).
- Inbound plaintext (15006) and tunnel (15008, `inbound_path`): PeerAuthentication and
  authorization, then transparent delivery to the app; open connections are re-checked when
  policy changes.

Every connection ends with one structured log line (`<path>.complete`) carrying source,
destination, identities, endpoint, bytes, duration, result and, when denied, the policy; with a
`telemetry`, also Istio's metrics and an access-log line (`nodeagent.telemetry.dataplane`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from nodeagent.authn import Authenticator
from nodeagent.balance import Registry
from nodeagent.http import Limits
from nodeagent.identity.api import IdentityProvider, IdentityUnavailable
from nodeagent.inpod import Netns, PodListeners
from nodeagent.log import get_logger
from nodeagent.proxy.connection import IDENTITY_WAIT, ConnLog, Denied, DirectionStats, SelfCall
from nodeagent.proxy.inbound import DestinationL7
from nodeagent.proxy.inbound_path import InboundPath
from nodeagent.proxy.outbound import OutboundPolicy
from nodeagent.proxy.outbound_path import OutboundPath
from nodeagent.proxy.pod_core import PodCore
from nodeagent.snapshot import Snapshot, Workload
from nodeagent.telemetry.dataplane import Sinks
from nodeagent.tunnel import HboneStream, SessionCache, TunnelError

log = get_logger("proxy")


class PodProxy:
    """Serves one pod's three listeners until cancelled."""

    def __init__(
        self,
        pod: str,
        netns: Netns,
        listeners: PodListeners,
        *,
        registry: Registry,
        workload: Workload | None = None,
        identities: IdentityProvider | None = None,
        snapshot: Callable[[], Snapshot] = Snapshot.empty,
        sessions: SessionCache | None = None,
        outbound_policy: OutboundPolicy = "ALLOW_ANY",
        destination_l7: DestinationL7 = "always",
        identity_wait: float = IDENTITY_WAIT,
        telemetry: Sinks | None = None,
        http_limits: Limits | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.core = PodCore(
            pod,
            netns,
            listeners,
            registry,
            workload=workload,
            identities=identities,
            snapshot=snapshot,
            sessions=sessions if sessions is not None else SessionCache(),
            outbound_policy=outbound_policy,
            destination_l7=destination_l7,
            identity_wait=identity_wait,
            telemetry=telemetry,
            http_limits=http_limits,
            authenticator=authenticator if authenticator is not None else Authenticator(),
        )
        self.outbound = OutboundPath(self.core)
        self.inbound = InboundPath(self.core)

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

        stats = self.core.stats
        inbound = d(stats.inbound)
        inbound["closed_by_policy"] = self.inbound.live.closed_by_policy
        inbound["tunnel_connections"] = self.inbound.tunnels_accepted
        # Requests parsed on the pod's HTTP, HTTP/2 and gRPC ports (destination mode), and
        # those it refused.
        http, http2 = self.inbound.http.statistics(), self.inbound.http2.statistics()
        inbound["http_requests"] = http.get("requests", 0) + http2.get("requests", 0)
        inbound["http_refused"] = http.get("flag_UAEX", 0) + http2.get("flag_UAEX", 0)
        return {"outbound": d(stats.outbound), "inbound": inbound}

    def pool_statistics(self) -> dict[str, int]:
        return self.core.pool.statistics()

    def listener_addresses(self) -> list[tuple[str, str]]:
        """(role, "host:port") of each listener still open."""
        rows = []
        for role, listener in (
            ("outbound", self.core.listeners.outbound),
            ("inbound-plaintext", self.core.listeners.inbound),
            ("tunnel", self.core.listeners.tunnel),
        ):
            try:
                host, port = listener.socket.getsockname()[:2]
            except OSError:  # closed while the pod is being removed
                continue
            rows.append((role, f"{host}:{port}"))
        return rows

    def close_listeners(self) -> None:
        """No new connections (a drain); the open ones go on, and their clients are told to
        reconnect, to the agent taking over: HTTP/1.1 responses from now on say `connection:
        close`, HTTP/2 and HBONE connections get a graceful GOAWAY."""
        self.core.listeners.close()
        self.outbound.drain()
        self.inbound.drain()

    def policy_changed(self) -> None:
        """A new snapshot: re-check the open inbound connections (sets an event only)."""
        self.inbound.policy_changed()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = self.core.listeners
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept, listeners.outbound, "outbound", nursery)
                nursery.start_soon(self._accept, listeners.inbound, "inbound", nursery)
                nursery.start_soon(self._accept, listeners.tunnel, "tunnel", nursery)
                nursery.start_soon(self.inbound.watch_policy)
                nursery.start_soon(self.inbound.watch_revocation)
                await nursery.start(self.core.pool.run)
                await nursery.start(self.outbound.run)
                task_status.started()
        finally:
            for listener in (listeners.outbound, listeners.inbound, listeners.tunnel):
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            with trio.CancelScope(shield=True):
                await self.outbound.aclose()
                await self.core.pool.aclose()

    async def _accept(
        self, listener: trio.SocketListener, kind: str, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                # The agent drains (`PodListeners.close()`): no new connections, the open
                # ones go on in `nursery` until they end or the agent's drain deadline.
                return
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                log.warning("accept.failed", pod=self.core.pod, listener=kind, error=str(exc))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve, stream, kind)

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, client: trio.SocketStream, kind: str) -> None:
        if kind == "tunnel":
            await self._serve_tunnel(client)
            return
        conn = ConnLog(kind)
        if kind == "outbound":
            work = self.outbound.serve(client, conn)
        else:
            work = self.inbound.serve_plaintext(client, conn)
        await self._run(conn, work, client)

    async def _serve_tunnel(self, client: trio.SocketStream) -> None:
        """A 15008 connection: a refused handshake is one failed connection (one log line);
        an accepted one is only a carrier, each of its CONNECT streams is a connection."""
        conn = ConnLog("tunnel")
        stats = self.core.stats.inbound
        # Counted while the handshake runs (so `opened == closed` means nothing is in flight).
        stats.opened += 1
        try:
            hconn, resumed = await self.inbound.accept_tunnel(client, conn)
        except Exception as exc:
            stats.opened -= 1  # `_run` counts it again, as a failed connection
            await self._run(conn, _raise(exc), client)
            return
        except BaseException:
            stats.opened -= 1
            raise
        stats.opened -= 1

        async def run_stream(stream: HboneStream) -> None:
            sconn = ConnLog("tunnel")
            await self._run(sconn, self.inbound.serve_stream(hconn, stream, sconn, resumed), stream)

        await self.inbound.serve_tunnel(hconn, run_stream)

    async def _run(
        self, conn: ConnLog, work: Awaitable[None], client: trio.abc.AsyncResource
    ) -> None:
        """Run one connection's `work`: its counters, its outcome, its one log line."""
        kind = conn.kind
        stats = self.core.stats.outbound if kind == "outbound" else self.core.stats.inbound
        stats.opened += 1
        if kind == "tunnel":
            stats.mtls += 1
        try:
            await work
        except Denied as exc:
            stats.denied += 1
            if isinstance(exc, SelfCall) and self.core.telemetry is not None:
                self.core.telemetry.metrics.self_call_refused(kind, exc.port)
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

    def _log(self, conn: ConnLog) -> None:
        r = conn.relay
        fields: dict[str, Any] = {
            "conn": conn.cid,
            "pod": self.core.pod,
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
        for key in ("flag", "policy", "error", "resumed", "pooled"):
            value = getattr(conn, key)
            if value is not None:
                fields[key] = value
        if conn.result == "ok":
            log.info(f"{conn.kind}.complete", **fields)
        else:
            log.warning(f"{conn.kind}.complete", **fields)


async def _raise(exc: BaseException) -> None:
    raise exc
