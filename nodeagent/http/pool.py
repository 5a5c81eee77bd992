"""Upstream HTTP/1.1 connections: opened through the injected connector, pooled per endpoint.

A connection goes back to the pool only when h11 says both sides finished the exchange cleanly
(keep-alive on both ends, the whole response read); anything else is closed. Idle connections are
reused newest first (the likeliest to still be open); a reused connection that fails before any
response byte is the proxy's cue to try once more on a fresh one (the server may have closed it
while it sat idle).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from nodeagent.snapshot.model import Endpoint

Connector = Callable[[Endpoint, int], Awaitable[trio.abc.Stream]]
READ_SIZE = 64 * 1024


class UpstreamConnection:
    """One upstream stream with its h11 client state."""

    def __init__(
        self, stream: trio.abc.Stream, key: tuple[str, int], *, max_header_bytes: int
    ) -> None:
        self.stream = stream
        self.key = key
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.reused = False
        self.received_any = False

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(READ_SIZE)
                if data:
                    self.received_any = True
                self.conn.receive_data(bytes(data))
                continue
            return event  # type: ignore[return-value]

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


@dataclass(slots=True)
class PoolStats:
    connects: int = 0
    reuses: int = 0
    connect_failures: int = 0
    closed: int = 0


class ConnectionPool:
    """Idle upstream connections per (address, port) of an endpoint."""

    def __init__(
        self,
        connector: Connector,
        *,
        max_idle_per_endpoint: int = 16,
        connect_timeout: float = 10.0,
        max_header_bytes: int = 60 * 1024,
    ) -> None:
        self._connector = connector
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._max_idle = max_idle_per_endpoint
        self._connect_timeout = connect_timeout
        self._max_header_bytes = max_header_bytes
        self.stats = PoolStats()

    def idle_count(self, endpoint: Endpoint | None = None) -> int:
        if endpoint is None:
            return sum(len(v) for v in self._idle.values())
        return len(self._idle.get((endpoint.address, endpoint.port), ()))

    async def acquire(
        self, endpoint: Endpoint, service_port: int, *, fresh: bool = False
    ) -> UpstreamConnection:
        """An idle connection to `endpoint`, else a new one (connect errors propagate:
        OSError, trio.TooSlowError, or the connector's own)."""
        key = (endpoint.address, endpoint.port)
        idle = self._idle.get(key)
        if idle and not fresh:
            up = idle.pop()
            up.reused = True
            self.stats.reuses += 1
            return up
        timeout = self._connect_timeout if self._connect_timeout > 0 else math.inf
        try:
            with trio.fail_after(timeout):
                stream = await self._connector(endpoint, service_port)
        except BaseException:
            self.stats.connect_failures += 1
            raise
        self.stats.connects += 1
        return UpstreamConnection(stream, key, max_header_bytes=self._max_header_bytes)

    async def release(self, up: UpstreamConnection) -> None:
        """Return a finished connection for reuse, or close it if it cannot be reused."""
        if up.reusable:
            idle = self._idle.setdefault(up.key, [])
            if len(idle) < self._max_idle:
                up.conn.start_next_cycle()
                up.received_any = False
                idle.append(up)
                return
        await self.discard(up)

    async def discard(self, up: UpstreamConnection) -> None:
        self.stats.closed += 1
        await up.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for up in conns:
                await self.discard(up)
