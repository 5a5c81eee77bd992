"""Upstream HTTP/1.1 connections: opened through the injected connector, pooled per endpoint.

A connection goes back to the pool only when h11 says both sides finished the exchange cleanly
(keep-alive on both ends, the whole response read); anything else is closed. Idle connections are
reused newest first (the likeliest to still be open); a reused connection that fails before any
response byte is the proxy's cue to try once more on a fresh one (the server may have closed it
while it sat idle).

Circuit breaking (`acquire(..., breaker=…)`, the cluster's `balance.CircuitBreaker`): every
upstream connection holds a connection token (tcp.maxConnections) until it is closed, idle ones
included. A request that finds no idle connection and may not open one waits in the pending
queue (http1MaxPendingRequests) for one to be freed, at most the connect timeout; a full queue
or the timeout raise `UpstreamOverflow` (503 UO) at once. A connection is closed after
maxRequestsPerConnection requests, and an idle one older than the idle timeout is not reused.

TLS origination (`acquire(..., tls=…)`, the cluster's `balance.UpstreamTls`): a new
connection is wrapped by `origination.originate` right after the connector opened it; pooled
connections are keyed by the settings too, so a plain and a TLS connection to one endpoint are
never mixed up.

Certificate lifetime: a stream that carries `credentials` (a client tunnel's
`TunnelCredentials`) is asked before every reuse and at release whether it may carry another
request; once either end's certificate expired, ours rotated or the peer's was revoked, it is
closed instead (`PoolStats.retired`). Requests under way are not cut: a request that started
while both certificates held finishes on its connection.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import h11
import trio

from nodeagent.balance import UpstreamTls
from nodeagent.balance.pool import CircuitBreaker, ClusterHolds, ConnectionToken, Overflow
from nodeagent.http.errors import UpstreamOverflow
from nodeagent.http.h1fast import FastClient, H1Codec, NeedsH11, fast_request
from nodeagent.http.origination import originate
from nodeagent.snapshot.model import Endpoint
from nodeagent.sockio import FastIO

Connector = Callable[[Endpoint, int], Awaitable[trio.abc.Stream]]
PoolKey = tuple[str, int, UpstreamTls | None]  # endpoint address, port, TLS origination
READ_SIZE = 64 * 1024


class Credentials(Protocol):
    """What authenticated a stream at its handshake (`tunnel.TunnelCredentials`)."""

    def problem(self) -> str | None:
        """Why the stream may not carry another request, or None while it may."""
        ...


class UpstreamConnection:
    """One upstream stream with its HTTP/1.1 client codec: the fast codec (`h1fast`) until an
    exchange it does not handle, then h11 for the rest of the connection."""

    def __init__(self, stream: trio.abc.Stream, key: PoolKey, *, max_header_bytes: int) -> None:
        self.stream = stream
        self.io = FastIO(stream)
        self.key = key
        self.max_header_bytes = max_header_bytes
        self.conn: H1Codec = FastClient(max_head_bytes=max_header_bytes)
        self.reused = False
        self.received_any = False
        self.token: ConnectionToken | None = None  # the cluster's connection slot, if limited
        self.cluster: str | None = None
        self.idle_since = 0.0
        self.credentials: Credentials | None = getattr(stream, "credentials", None)

    def retired(self) -> str | None:
        """Why this connection may carry no further request (its certificates), or None."""
        return None if self.credentials is None else self.credentials.problem()

    async def send(self, event: h11.Event) -> None:
        await self.write(self.encode(event))

    def encode(self, event: h11.Event) -> bytes:
        """`event`'s bytes without sending them: callers batch a head and the body that is
        already at hand into one write (one syscall, one TLS record). A request the fast codec
        does not handle moves the connection to h11 first (it is between exchanges then)."""
        fast = isinstance(self.conn, FastClient)
        if fast and isinstance(event, h11.Request) and not fast_request(event):
            self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_header_bytes)
        return self.conn.send(event) or b""

    async def write(self, data: bytes) -> None:
        if data:
            await self.io.send_all(data)

    def buffered_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event from what was already received (no I/O); a response head the fast
        codec does not handle moves the connection to h11, fed the same bytes."""
        while True:
            try:
                return self.conn.next_event()
            except NeedsH11:
                assert isinstance(self.conn, FastClient)
                self.conn = self.conn.handover(self.max_header_bytes)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.buffered_event()
            if event is h11.NEED_DATA:
                data = await self.io.receive_some(READ_SIZE)
                if data:
                    self.received_any = True
                self.conn.receive_data(data)
                continue
            return event  # type: ignore[return-value]

    @property
    def reusable(self) -> bool:
        """Both sides finished the exchange cleanly, and the server sent nothing past its
        response (bytes that would be read as the next request's response)."""
        conn = self.conn
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        return not conn.trailing_data[0]

    async def aclose(self) -> None:
        if self.token is not None:
            self.token.release()
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


@dataclass(slots=True)
class PoolStats:
    connects: int = 0
    reuses: int = 0
    connect_failures: int = 0
    closed: int = 0
    pending_waits: int = 0  # requests that waited in the pending queue for a connection
    retired: int = 0  # closed: a certificate expired, rotated or was revoked since the handshake


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
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._max_idle = max_idle_per_endpoint
        self._connect_timeout = connect_timeout
        self._max_header_bytes = max_header_bytes
        self.stats = PoolStats()
        # Requests in a cluster's pending queue park here until a connection is freed.
        self._waiters: dict[str, trio.lowlevel.ParkingLot] = {}
        self._holds = ClusterHolds()  # the cluster slots this pool's connections hold

    def idle_count(self, endpoint: Endpoint | None = None) -> int:
        if endpoint is None:
            return sum(len(v) for v in self._idle.values())
        return sum(
            len(v) for k, v in self._idle.items() if k[:2] == (endpoint.address, endpoint.port)
        )

    async def acquire(
        self,
        endpoint: Endpoint,
        service_port: int,
        *,
        fresh: bool = False,
        breaker: CircuitBreaker | None = None,
        connect_timeout: float | None = None,
        idle_timeout: float | None = None,
        tls: UpstreamTls | None = None,
        host: str = "",
    ) -> UpstreamConnection:
        """An idle connection to `endpoint`, else a new one (connect errors propagate:
        OSError, trio.TooSlowError, or the connector's own). With a `breaker`, its connection
        and pending limits apply (UpstreamOverflow when they refuse). With `tls`, a new
        connection speaks TLS to the endpoint (`host`: the SNI unless `tls.sni` says)."""
        key = (endpoint.address, endpoint.port, tls)
        if connect_timeout is None:
            connect_timeout = self._connect_timeout
        if not fresh:
            up = await self._take_idle(key, idle_timeout)
            if up is not None:
                return up
        token: ConnectionToken | None = None
        if breaker is not None:
            # Past the limit only when this pool holds none of the cluster's connections.
            got = self._holds.connection(breaker)
            if isinstance(got, Overflow):
                reused, token = await self._wait_pending(
                    key, breaker, got, connect_timeout, idle_timeout, fresh
                )
                if reused is not None:
                    return reused
            else:
                token = got
        timeout = connect_timeout if connect_timeout > 0 else math.inf
        try:
            with trio.fail_after(timeout):
                stream = await self._connector(endpoint, service_port)
                if tls is not None:
                    where = f"{endpoint.address}:{endpoint.port}"
                    stream = await originate(stream, tls, host=host, where=where)
        except BaseException:
            self.stats.connect_failures += 1
            if token is not None:
                token.release()
                self._wake(breaker)
            raise
        self.stats.connects += 1
        up = UpstreamConnection(stream, key, max_header_bytes=self._max_header_bytes)
        up.token = token
        up.cluster = breaker.cluster if breaker is not None else None
        return up

    async def _take_idle(
        self, key: PoolKey, idle_timeout: float | None
    ) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            up = idle.pop()
            if idle_timeout is not None and now - up.idle_since > idle_timeout:
                await self.discard(up)  # idle past http idleTimeout: not worth the risk
                continue
            if up.retired() is not None:
                self.stats.retired += 1
                await self.discard(up)
                continue
            up.reused = True
            self.stats.reuses += 1
            return up
        return None

    async def _wait_pending(
        self,
        key: PoolKey,
        breaker: CircuitBreaker,
        overflow: Overflow,
        connect_timeout: float,
        idle_timeout: float | None,
        fresh: bool,
    ) -> tuple[UpstreamConnection | None, ConnectionToken | None]:
        """No connection may be opened: wait in the pending queue (if it has room) until an
        idle connection to `key` or a connection slot is free, at most `connect_timeout`."""
        pending = breaker.try_acquire_pending()
        if isinstance(pending, Overflow):
            raise UpstreamOverflow(str(pending))
        self.stats.pending_waits += 1
        lot = self._waiters.setdefault(breaker.cluster, trio.lowlevel.ParkingLot())
        deadline = trio.current_time() + (connect_timeout if connect_timeout > 0 else math.inf)
        with pending:
            while True:
                with trio.move_on_at(deadline):
                    await lot.park()
                if not fresh:
                    up = await self._take_idle(key, idle_timeout)
                    if up is not None:
                        return up, None
                if breaker.full("connections"):
                    # A slot held by an idle connection to another endpoint of the cluster:
                    # close it, this request needs the slot more.
                    other = self._idle_of(breaker.cluster)
                    if other is not None:
                        await self.discard(other)
                if not breaker.full("connections"):
                    got = self._holds.connection(breaker)
                    if not isinstance(got, Overflow):
                        return None, got
                if trio.current_time() >= deadline:
                    raise UpstreamOverflow(
                        f"{overflow}: no connection freed within {connect_timeout:g}s"
                    )

    def _idle_of(self, cluster: str) -> UpstreamConnection | None:
        for conns in self._idle.values():
            for i, up in enumerate(conns):
                if up.cluster == cluster:
                    return conns.pop(i)
        return None

    def _wake(self, breaker: CircuitBreaker | None) -> None:
        if breaker is not None:
            self._wake_cluster(breaker.cluster)

    def _wake_cluster(self, cluster: str | None) -> None:
        if cluster is not None:
            lot = self._waiters.get(cluster)
            if lot is not None and len(lot):
                lot.unpark_all()

    async def release(self, up: UpstreamConnection) -> None:
        """Return a finished connection for reuse, or close it if it cannot be reused."""
        exhausted = up.token is not None and up.token.note_request()
        if up.reusable and not exhausted and up.retired() is not None:
            self.stats.retired += 1
            exhausted = True
        if up.reusable and not exhausted:
            idle = self._idle.setdefault(up.key, [])
            if len(idle) < self._max_idle:
                up.conn.start_next_cycle()
                up.received_any = False
                up.idle_since = trio.current_time()
                idle.append(up)
                self._wake_cluster(up.cluster)
                return
        await self.discard(up)

    async def discard(self, up: UpstreamConnection) -> None:
        self.stats.closed += 1
        await up.aclose()
        self._wake_cluster(up.cluster)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for up in conns:
                await self.discard(up)
