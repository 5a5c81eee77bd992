"""Pooled upstream HTTP/2 connections, per endpoint: many requests (streams) share one
connection, a new one is opened only when every open one is full (the peer's
SETTINGS_MAX_CONCURRENT_STREAMS, at most `max_streams`) or gone. When every connection is full
and the cluster's `tcp.maxConnections` forbids another, a request waits in the pending queue
(`http.http1MaxPendingRequests`, which Envoy applies to HTTP/2 pools too) until a stream or a
connection slot is freed, at most the connect timeout; a full queue refuses at once.

Each connection is one stream from the injected connector (through the mesh: an HBONE CONNECT
stream to the pod), driven by `H2Connection.run` in the pool's nursery (`H2Pool.run`), so a
connection outlives the client connection whose request opened it. An idle connection closes
after `idle_timeout`; a connection whose transport has a certificate (`credentials`) that no
longer allows reuse takes no new streams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from nodeagent.balance import Overflow
from nodeagent.balance import Picker as Cluster
from nodeagent.balance.pool import CircuitBreaker, ClusterHolds, ConnectionToken
from nodeagent.http.errors import UpstreamOverflow
from nodeagent.http.pool import Credentials
from nodeagent.http2.conn import H2Connection, StreamReset
from nodeagent.http2.streams import Headers, Opened, RequestFacts
from nodeagent.log import get_logger
from nodeagent.snapshot import Endpoint

Connector = Callable[[Endpoint, int], Awaitable[trio.abc.Stream]]
log = get_logger("http2.pool")
MAX_STREAMS = 100  # per upstream connection (Envoy's default for HTTP/2 upstreams is 2^31-1)
IDLE_TIMEOUT = 3600.0  # DestinationRule http.idleTimeout's default


@dataclass(slots=True)
class PoolStats:
    connects: int = 0
    reuses: int = 0
    pending_waits: int = 0  # requests that waited in the pending queue for a stream


class H2Pool:
    def __init__(self, connector: Connector, *, connect_timeout: float = 10.0) -> None:
        self.connector = connector
        self.connect_timeout = connect_timeout
        self.stats = PoolStats()
        self._conns: dict[tuple[str, int], list[H2Connection]] = {}
        self._nursery: trio.Nursery | None = None
        self._opening: dict[tuple[str, int], trio.Event] = {}
        self._tokens: dict[int, ConnectionToken] = {}  # connection id → its maxConnections slot
        self._holds = ClusterHolds()  # the cluster slots this pool's connections hold
        self._freed = trio.lowlevel.ParkingLot()  # pending requests: a stream or a slot freed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connections' tasks until cancelled (then every connection closes)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def spawn(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run `task` beside the connections (a mirrored copy: outlives its request); dropped
        when the pool is not running."""
        if self._nursery is not None:
            self._nursery.start_soon(task)

    def connection_count(self) -> int:
        return sum(len(v) for v in self._conns.values())

    async def acquire(
        self,
        endpoint: Endpoint,
        service_port: int,
        *,
        max_streams: int = MAX_STREAMS,
        idle_timeout: float = IDLE_TIMEOUT,
        breaker: CircuitBreaker | None = None,
    ) -> tuple[H2Connection, bool]:
        """A connection to `endpoint` with room for one more stream, and whether it was reused.
        Raises OSError (or the connector's error) when a new one cannot be opened, and
        UpstreamOverflow when the cluster's `tcp.maxConnections` forbids a new one. Each stream
        opened on it is counted with `stream_opened`."""
        key = (endpoint.address, endpoint.port)
        reused = await self._reusable(key, max_streams)
        if reused is not None:
            return reused, True
        token: ConnectionToken | None = None
        if breaker is not None:
            # Past the limit only when this pool holds none of the cluster's connections.
            got = self._holds.connection(breaker)
            if isinstance(got, Overflow):
                reused, token = await self._wait_pending(key, max_streams, breaker, got)
                if reused is not None:
                    return reused, True
            else:
                token = got
        done = self._opening[key] = trio.Event()
        try:
            conn = await self._open(endpoint, service_port, idle_timeout, token)
        except BaseException:
            if token is not None:
                token.release()
                self._wake_pending()
            raise
        finally:
            del self._opening[key]
            done.set()
        self._conns.setdefault(key, []).append(conn)
        return conn, False

    async def _reusable(self, key: tuple[str, int], max_streams: int) -> H2Connection | None:
        while True:
            conns = self._conns.setdefault(key, [])
            conns[:] = [c for c in conns if c.alive]
            for conn in conns:
                if _usable(conn) and min(conn.capacity(), max_streams - len(conn.streams)) > 0:
                    self.stats.reuses += 1
                    return conn
            opening = self._opening.get(key)
            if opening is None:
                return None
            await opening.wait()  # one connect at a time per endpoint; then look again

    async def _wait_pending(
        self, key: tuple[str, int], max_streams: int, breaker: CircuitBreaker, overflow: Overflow
    ) -> tuple[H2Connection | None, ConnectionToken | None]:
        """No stream free and no connection may be opened: wait in the pending queue (if it
        has room) for a stream on a connection to `key` or a connection slot, at most the
        connect timeout. Raises UpstreamOverflow when the queue is full or nothing was freed."""
        pending = breaker.try_acquire_pending()
        if isinstance(pending, Overflow):
            raise UpstreamOverflow(str(pending))
        self.stats.pending_waits += 1
        deadline = trio.current_time() + self.connect_timeout
        with pending:
            while trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await self._freed.park()
                conn = await self._reusable(key, max_streams)
                if conn is not None:
                    return conn, None
                got = self._holds.connection(breaker)
                if not isinstance(got, Overflow):
                    return None, got
        raise UpstreamOverflow(f"{overflow}: no stream freed within {self.connect_timeout:g}s")

    def _wake_pending(self) -> None:
        self._freed.unpark_all()

    def stream_opened(self, conn: H2Connection) -> None:
        """Count a stream opened on `conn` (from `acquire`): after maxRequestsPerConnection of
        them it takes no new one (GOAWAY; the streams under way finish)."""
        token = self._tokens.get(conn.id)
        if token is not None and token.note_request():
            conn.close()

    async def _open(
        self, endpoint: Endpoint, service_port: int, idle: float, token: ConnectionToken | None
    ) -> H2Connection:
        if self._nursery is None:
            raise OSError("the HTTP/2 upstream pool is not running")
        with trio.fail_after(self.connect_timeout):
            transport = await self.connector(endpoint, service_port)
        conn = H2Connection(transport, client=True)
        conn.on_stream_end = self._wake_pending
        self.stats.connects += 1
        if token is not None:
            self._tokens[conn.id] = token
        self._nursery.start_soon(self._serve, conn, idle)
        return conn

    async def _serve(self, conn: H2Connection, idle: float) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reap_idle, conn, idle, nursery.cancel_scope)
                await conn.run()
                nursery.cancel_scope.cancel()
        except Exception as exc:  # one upstream connection ends; the pool (and the pod) go on
            conn.fail(repr(exc))
            log.error("upstream.failed", conn=conn.id, error=repr(exc))
        finally:
            token = self._tokens.pop(conn.id, None)
            if token is not None:
                token.release()  # its tcp.maxConnections slot
            self._wake_pending()

    async def _reap_idle(self, conn: H2Connection, idle: float, scope: trio.CancelScope) -> None:
        while conn.alive:
            await trio.sleep_until(conn.last_active + idle)
            if not conn.streams and trio.current_time() >= conn.last_active + idle:
                conn.close()
                return

    async def aclose(self) -> None:
        for conns in self._conns.values():
            for conn in conns:
                conn.fail("pool closed")
        self._conns.clear()
        await trio.lowlevel.checkpoint()


def _usable(conn: H2Connection) -> bool:
    if not conn.accepts_streams():
        return False
    credentials: Credentials | None = getattr(conn.transport, "credentials", None)
    if credentials is not None and credentials.problem() is not None:
        conn.close()  # a certificate expired, rotated or was revoked: no new streams on it
        return False
    return True


class H2Upstreams:
    """The HTTP/2 upstreams of an HTTP/2 proxy: a stream per attempt on `pool`'s connections
    (`tcp.maxConnections`, `maxConcurrentStreams`, `maxRequestsPerConnection` apply)."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool

    async def open(
        self,
        endpoint: Endpoint,
        service_port: int,
        headers: Headers,
        facts: RequestFacts,
        cluster: Cluster,
    ) -> Opened:
        pool_limits = cluster.policy.pool
        began = trio.current_time()
        conn, reused = await self.pool.acquire(
            endpoint,
            service_port,
            max_streams=pool_limits.max_concurrent_streams or MAX_STREAMS,
            idle_timeout=pool_limits.http_idle_timeout_s,
            breaker=cluster.breaker,
        )
        setup = 0.0 if reused else trio.current_time() - began
        try:
            # A request without a body goes out whole: END_STREAM on its head.
            up = conn.open_stream(headers, end_stream=facts.end_stream)
        except StreamReset as exc:
            raise StreamReset(str(exc), refused=reused) from None
        self.pool.stream_opened(conn)
        return Opened(up, reused, setup)
