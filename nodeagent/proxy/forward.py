"""Plain TCP forwarding for one enrolled pod: the proxy until the mTLS tunnel lands.

Outbound (15001): a connection the pod's app made, captured by REDIRECT; the agent connects to the
original destination from inside the pod's netns with the bypass mark. Inbound (15006): a
connection to the pod, captured on its way in; delivered to the app from inside the netns with the
client's own address as source (IP_TRANSPARENT). The tunnel port (15008) is bound so peers find it,
but refuses until mTLS exists.
"""

from __future__ import annotations

import itertools
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from nodeagent.inpod import Netns, PodListeners, original_dst
from nodeagent.log import get_logger
from nodeagent.proxy.relay import relay

log = get_logger("proxy.forward")
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 3600.0
_conn_ids = itertools.count(1)


@dataclass(slots=True)
class DirectionStats:
    opened: int = 0
    closed: int = 0
    failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(slots=True)
class PodProxyStats:
    outbound: DirectionStats = field(default_factory=DirectionStats)
    inbound: DirectionStats = field(default_factory=DirectionStats)


class PodProxy:
    """Serves one pod's three listeners until cancelled."""

    def __init__(self, pod: str, netns: Netns, listeners: PodListeners) -> None:
        self.pod = pod
        self.netns = netns
        self.listeners = listeners
        self.stats = PodProxyStats()

    def statistics(self) -> dict[str, Any]:
        def d(s: DirectionStats) -> dict[str, int]:
            return {
                "opened": s.opened,
                "closed": s.closed,
                "failed": s.failed,
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
            if kind == "tunnel":
                # No mTLS yet: nothing may arrive on the tunnel port in plaintext.
                await stream.aclose()
                continue
            nursery.start_soon(self._serve, stream, kind)

    async def _serve(self, client: trio.SocketStream, kind: str) -> None:
        cid = next(_conn_ids)
        stats = self.stats.outbound if kind == "outbound" else self.stats.inbound
        stats.opened += 1
        started = time.monotonic()
        src: tuple[str, int] = ("?", 0)
        dst: tuple[str, int] = ("?", 0)
        error = ""
        result = None
        try:
            src = client.socket.getpeername()
            dst = original_dst(client.socket)
            bind_to = (src[0], 0) if kind == "inbound" else None
            upstream = await self._connect(dst, bind_to)
            result = await relay(client, upstream, idle_timeout=IDLE_TIMEOUT)
            error = result.error
        except (OSError, trio.TooSlowError) as exc:
            error = f"connect {dst[0]}:{dst[1]}: {exc or type(exc).__name__}"
            stats.failed += 1
            await client.aclose()
        finally:
            stats.closed += 1
            if result is not None:
                stats.bytes_sent += result.sent
                stats.bytes_received += result.received
            log.info(
                f"{kind}.complete",
                conn=cid,
                pod=self.pod,
                src=f"{src[0]}:{src[1]}",
                dst=f"{dst[0]}:{dst[1]}",
                sent=result.sent if result else 0,
                received=result.received if result else 0,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                error=error or None,
            )

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
