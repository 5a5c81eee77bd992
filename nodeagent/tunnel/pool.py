"""The pool of HBONE connections one pod's proxy opens (ztunnel's `proxy/pool.rs`).

A connection is keyed by (source identity, destination identity, destination address) and
carries up to `max_streams` CONNECT streams at once; past that a second connection is opened.
A connection serves only the identity it verified, only while the TLS context that made it is
the source's current one (a rotated certificate retires it) and only before the peer
certificate's notAfter. One that has had no stream for `idle_timeout` is closed (GOAWAY).
Before a stream is put on a connection that has heard nothing from its peer for
`ping_interval`, a PING must come back within `ping_timeout`, else the connection is replaced
(pod IPs are reused: ztunnel#1637). A connection that fails before answering a CONNECT is
replaced once.

`PoolBook` is the bookkeeping without I/O (tested with a fake clock); `TunnelPool` runs the
connections in its own nursery (`run`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from nodeagent.contract import TUNNEL_PORT
from nodeagent.identity.api import IdentityProvider
from nodeagent.inpod import Netns
from nodeagent.tunnel.client import CONNECT_TIMEOUT, SessionCache, TunnelInfo, connect_hbone
from nodeagent.tunnel.errors import STREAM_REFUSED, TunnelError
from nodeagent.tunnel.h2conn import PING_INTERVAL, PING_TIMEOUT, HboneConnection, HboneStream
from nodeagent.tunnel.hbone import MAX_STREAMS, ConnectRequest

IDLE_TIMEOUT = 60.0
PoolKey = tuple[str, str, str]  # (source identity, destination identity, destination address)
C = TypeVar("C")


@dataclass(slots=True, eq=False)
class PoolEntry(Generic[C]):
    key: PoolKey
    conn: C
    streams: int = 0  # open (or opening) streams
    idle_since: float | None = None
    retired: bool = False  # takes no new streams; closed once its streams are done


@dataclass(slots=True)
class PoolStats:
    connections_opened: int = 0
    streams_opened: int = 0
    streams_reused: int = 0  # of streams_opened, those on an already open connection
    idle_closed: int = 0
    replaced: int = 0  # half-open connections found (PING unanswered) and replaced


class PoolBook(Generic[C]):
    """Which connection takes the next stream, and which are idle for too long. No I/O."""

    def __init__(self, *, max_streams: int = MAX_STREAMS, idle_timeout: float = IDLE_TIMEOUT):
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._by_key: dict[PoolKey, list[PoolEntry[C]]] = {}
        self.stats = PoolStats()

    def pick(self, key: PoolKey, usable: Callable[[C], bool]) -> PoolEntry[C] | None:
        """A connection for `key` with room for one more stream (the fullest first, so
        connections drain and idle out instead of all staying half used)."""
        best: PoolEntry[C] | None = None
        for entry in self._by_key.get(key, ()):
            if entry.retired or entry.streams >= self.max_streams:
                continue
            if not usable(entry.conn):
                entry.retired = True
                continue
            if best is None or entry.streams > best.streams:
                best = entry
        return best

    def add(self, key: PoolKey, conn: C, now: float) -> PoolEntry[C]:
        entry = PoolEntry(key, conn, idle_since=now)
        self._by_key.setdefault(key, []).append(entry)
        self.stats.connections_opened += 1
        return entry

    def stream_opened(self, entry: PoolEntry[C], *, reused: bool) -> None:
        entry.streams += 1
        entry.idle_since = None
        self.stats.streams_opened += 1
        if reused:
            self.stats.streams_reused += 1

    def stream_closed(self, entry: PoolEntry[C], now: float) -> None:
        entry.streams -= 1
        if entry.streams == 0:
            entry.idle_since = now

    def retire(self, entry: PoolEntry[C]) -> None:
        entry.retired = True

    def remove(self, entry: PoolEntry[C]) -> None:
        entries = self._by_key.get(entry.key)
        if entries is not None and entry in entries:
            entries.remove(entry)
            if not entries:
                del self._by_key[entry.key]

    def expired(self, now: float) -> list[PoolEntry[C]]:
        """Connections with no stream: retired ones at once, others after `idle_timeout`."""
        out = []
        for entries in self._by_key.values():
            for entry in entries:
                if entry.streams or entry.idle_since is None:
                    continue
                if entry.retired or now - entry.idle_since >= self.idle_timeout:
                    out.append(entry)
        return out

    def next_expiry(self) -> float:
        deadlines = [
            e.idle_since + self.idle_timeout
            for entries in self._by_key.values()
            for e in entries
            if not e.streams and e.idle_since is not None
        ]
        return min(deadlines, default=math.inf)

    def entries(self) -> list[PoolEntry[C]]:
        return [e for entries in self._by_key.values() for e in entries]

    def has(self, key: PoolKey) -> bool:
        return key in self._by_key


def _usable(context: Any) -> Callable[[HboneConnection], bool]:
    def usable(conn: HboneConnection) -> bool:
        if not conn.accepts_streams() or conn.context is not context:
            return False
        # Both certificates still valid, ours not rotated, the peer not revoked.
        return conn.credentials is None or conn.credentials.problem() is None

    return usable


class TunnelPool:
    """One pod's pooled HBONE connections. `run` must be running for `open_stream` to work."""

    def __init__(
        self,
        *,
        netns: Netns,
        identities: IdentityProvider | None,
        sessions: SessionCache | None = None,
        port: int = TUNNEL_PORT,
        max_streams: int = MAX_STREAMS,
        idle_timeout: float = IDLE_TIMEOUT,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.netns = netns
        self.identities = identities
        self.sessions = sessions
        self.port = port
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.book: PoolBook[HboneConnection] = PoolBook(
            max_streams=max_streams, idle_timeout=idle_timeout
        )
        self._locks: dict[PoolKey, trio.Lock] = {}
        self._reaper_at = math.inf  # when the idle reaper wakes up next
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()

    def statistics(self) -> dict[str, int]:
        s = self.book.stats
        entries = self.book.entries()
        return {
            "connections": len(entries),
            "streams": sum(e.streams for e in entries),
            "connections_opened": s.connections_opened,
            "streams_opened": s.streams_opened,
            "streams_reused": s.streams_reused,
            "idle_closed": s.idle_closed,
            "replaced": s.replaced,
            "opener_locks": len(self._locks),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._release_idle()
        finally:
            self._nursery = None

    async def _release_idle(self) -> None:
        while True:
            self._reaper_at = self.book.next_expiry()
            with trio.move_on_at(self._reaper_at):
                await self._changed.wait()
            self._changed = trio.Event()
            for entry in self.book.expired(trio.current_time()):
                self.book.remove(entry)
                self._prune(entry.key)
                if not entry.retired:
                    self.book.stats.idle_closed += 1
                await entry.conn.close()

    async def open_stream(
        self,
        *,
        source_identity: str,
        expected_identity: str,
        request: ConnectRequest,
    ) -> tuple[HboneStream, TunnelInfo]:
        """A CONNECT stream to `request.address` (whose server must be `expected_identity`),
        on a pooled connection or a new one. TunnelError on failure."""
        if self._nursery is None or self.identities is None:
            raise TunnelError("no_pool", "the tunnel pool is not running")
        key = (source_identity, expected_identity, request.address)
        for attempt in range(2):
            entry, info = await self._entry(key, source_identity, fresh=attempt > 0)
            try:
                stream = await entry.conn.open_stream(request, self.connect_timeout)
            except TunnelError as exc:
                self._release(entry)
                # Once more, on a new connection: the pooled one died under us, or the server
                # never processed the stream (it drains: its GOAWAY crossed our CONNECT).
                died = exc.flag == "connection_failed" and info.reused
                if attempt == 0 and (died or exc.flag == STREAM_REFUSED):
                    self.book.retire(entry)
                    continue
                raise
            except BaseException:
                self._release(entry)
                raise
            stream.on_close.append(lambda _s, e=entry: self._release(e))  # type: ignore[misc]
            return stream, info
        raise AssertionError("unreachable")

    def _release(self, entry: PoolEntry[HboneConnection]) -> None:
        self.book.stream_closed(entry, trio.current_time())
        # Wake the idle reaper only when this connection now expires before its next wake-up
        # (not once per stream: an entry busy again before then needs nothing); a retired
        # one goes at once.
        idle_since = entry.idle_since
        if idle_since is not None and (
            entry.retired or idle_since + self.book.idle_timeout < self._reaper_at
        ):
            self._changed.set()

    async def _entry(
        self, key: PoolKey, source_identity: str, *, fresh: bool
    ) -> tuple[PoolEntry[HboneConnection], TunnelInfo]:
        assert self.identities is not None
        assert self._nursery is not None
        context = self.identities.client_context(source_identity)
        held = self._locks.get(key)
        if not fresh and (held is None or not held.locked()):
            # The common case, without the opener lock (no task switch, no lock object): a
            # pooled connection with room that spoke recently. Nothing awaits in between, so
            # no other task can take the room meanwhile.
            entry = self.book.pick(key, _usable(context))
            quiet = trio.current_time() - entry.conn.last_received if entry else math.inf
            if entry is not None and quiet < self.ping_interval:
                self.book.stream_opened(entry, reused=True)
                return entry, TunnelInfo(entry.conn.peer_identity, False, 0.0, reused=True)
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            return await self._pick_or_connect(key, lock, context, source_identity, fresh=fresh)
        finally:
            self._prune(key)

    def _prune(self, key: PoolKey) -> None:
        """Forget a key's opener lock once nothing holds, awaits or needs it (pod IPs churn:
        the map must not grow with every address ever dialled)."""
        lock = self._locks.get(key)
        unused = lock is not None and not lock.locked() and not lock.statistics().tasks_waiting
        if unused and not self.book.has(key):
            del self._locks[key]

    async def _pick_or_connect(
        self, key: PoolKey, lock: trio.Lock, context: Any, source_identity: str, *, fresh: bool
    ) -> tuple[PoolEntry[HboneConnection], TunnelInfo]:
        assert self.identities is not None
        assert self._nursery is not None
        # One opener per key: concurrent first streams share the connection it makes.
        async with lock:
            entry = None if fresh else self.book.pick(key, _usable(context))
            if entry is not None:
                quiet = trio.current_time() - entry.conn.last_received
                if quiet >= self.ping_interval and not await entry.conn.ping(self.ping_timeout):
                    # Half-open (a peer gone without FIN): replace it, do not serve errors.
                    self.book.stats.replaced += 1
                    self.book.retire(entry)
                    entry.conn.fail("no PING answer (peer gone)")
                    entry = None
            if entry is not None:
                self.book.stream_opened(entry, reused=True)
                info = TunnelInfo(entry.conn.peer_identity, False, 0.0, reused=True)
                return entry, info
            conn, info = await connect_hbone(
                netns=self.netns,
                identities=self.identities,
                source_identity=source_identity,
                address=key[2],
                expected_identity=key[1],
                sessions=self.sessions,
                port=self.port,
                connect_timeout=self.connect_timeout,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
            )
            entry = self.book.add(key, conn, trio.current_time())
            self.book.stream_opened(entry, reused=False)
            self._nursery.start_soon(self._serve, entry)
            return entry, info

    async def _serve(self, entry: PoolEntry[HboneConnection]) -> None:
        try:
            await entry.conn.run()
        finally:
            self.book.remove(entry)
            self._prune(entry.key)
            self._changed.set()

    async def aclose(self) -> None:
        for entry in self.book.entries():
            entry.conn.fail("pool closed")
        await trio.lowlevel.checkpoint()
