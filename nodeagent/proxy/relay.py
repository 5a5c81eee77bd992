"""Copy bytes both ways between two streams: half-close aware, bounded, with an idle timeout.

Each direction owns one fixed-size read, so a slow reader back-pressures the writer instead of
making the agent buffer without limit. An error on either side ends both directions.

The fast path (both ends a `trio.SocketStream` or a tunnel `HboneStream`, i.e. every path of
the agent) drives the sockets through `nodeagent.sockio`'s ends, because trio's stream methods yield
to the scheduler at least once per call and allocate a `bytes` per read, and `SSL_read` hands
out one 16 KiB record per call (loopback A/B in tests/tunnel/measure_relay.py: bulk 200 → 325
MiB/s, CPU per MiB -38%):

- reads go into a pooled `bytearray` with `recv_into` (no `bytes` allocated per chunk), and a
  connection holds a buffer only while a chunk is in flight: idle connections cost no buffer;
- a read or write that can complete now does so without a scheduler round trip; the pump waits
  only on EAGAIN / WANT_READ / WANT_WRITE or after a short read (the socket is then empty:
  waiting first saves a failing recv), and checkpoints every `YIELD_EVERY` chunks so a busy
  connection cannot starve the others;
- into an HBONE stream the reads are 256 KiB (`HBONE_CHUNK`): each becomes one DATA frame, and
  the HTTP/2 layer's cost is per frame; out of one, the DATA frames that arrived are copied
  into the buffer without waiting;
- out of an HBONE stream into a socket, while the pump waits (everything it read is written),
  the stream's `sink` lets the connection's reader write arriving DATA straight to the socket:
  no wake-up of the pump and no copy into its buffer per message (the reader already runs);
  what the socket does not take is queued and wakes the pump as before;
- the idle timeout is the deadline of the relay's cancel scope, moved on by reads (no watchdog
  task), and one pump runs in the caller's task: a connection spawns one task, not three.

Any other stream type (tests, L7 wrappers) takes the generic `receive_some`/`send_all` path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from nodeagent.sockio import YIELD_EVERY, End, HboneEnd, SockEnd, end_of
from nodeagent.sockio.ends import WANT_READ
from nodeagent.tunnel.h2conn import HboneStream

CHUNK = 64 * 1024
HBONE_CHUNK = 256 * 1024
IDLE_SLACK = 0.05  # the idle timeout fires this fraction of it late at most…
MAX_IDLE_SLACK = 1.0  # …and never more than this many seconds late
POOL_SIZE = 64  # idle buffers kept for reuse (64 of 64 KiB); more in flight are just allocated
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_pool: list[bytearray] = []
_big_pool: list[bytearray] = []  # HBONE_CHUNK buffers


async def wait(src: End, want: int, sink: Callable[[bytes], int] | None) -> None:
    """`src.wait(want)`; with `sink`, the HBONE stream `src` hands arriving DATA to it meanwhile
    (everything this pump read before has been written: the order holds)."""
    if sink is None or not isinstance(src, HboneEnd):
        await src.wait(want)
        return
    src.stream.sink = sink
    try:
        await src.wait(want)
    finally:
        src.stream.sink = None


@dataclass(slots=True)
class RelayResult:
    sent: int = 0  # client → upstream bytes
    received: int = 0  # upstream → client bytes
    error: str = ""  # why the relay ended early, "" on a clean close


async def relay(
    client: trio.abc.HalfCloseableStream,
    upstream: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float = math.inf,
    result: RelayResult | None = None,
    fast: bool = True,
) -> RelayResult:
    """Relay until both directions have seen EOF, an error, or `idle_timeout` of silence.

    Counts go into `result` as bytes move (pass one in to keep them if the relay is cancelled).
    `fast=False` forces the generic path (for tests and the before/after measurement).
    """
    result = result if result is not None else RelayResult()
    # The idle timeout is the relay's cancel scope's deadline, pushed on by the reads (no
    # watchdog task): a read moves it only once the deadline is nearer than `idle_timeout`,
    # by `idle_timeout + slack`, so a busy connection moves it once per `slack` at most and
    # the relay ends between `idle_timeout` and `idle_timeout + slack` after the last read.
    timed = idle_timeout != math.inf
    slack = min(idle_timeout * IDLE_SLACK, MAX_IDLE_SLACK) if timed else 0.0
    ends = (end_of(client), end_of(upstream)) if fast else (None, None)

    def active() -> None:
        if timed:
            now = trio.current_time()
            if scope.deadline - now < idle_timeout:
                scope.deadline = now + idle_timeout + slack

    def fail(exc: BaseException) -> None:
        result.error = result.error or f"{type(exc).__name__}: {exc}"
        nursery.cancel_scope.cancel()

    async def pump(
        src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream, upstream_dir: bool
    ) -> None:
        # Into an HBONE stream, read more at once (one DATA frame per read).
        size = HBONE_CHUNK if isinstance(dst, HboneStream) else CHUNK
        try:
            while True:
                data = await src.receive_some(size)
                active()
                if not data:
                    # Half-close: pass the FIN on and keep the other direction flowing.
                    await dst.send_eof()
                    return
                await dst.send_all(data)
                if upstream_dir:
                    result.sent += len(data)
                else:
                    result.received += len(data)
        except _BROKEN as exc:
            fail(exc)

    async def fast_pump(src: End, dst: End, upstream_dir: bool) -> None:
        unyielded = 0
        # Into an HBONE stream, read more at once: each read becomes one DATA frame, and the
        # HTTP/2 layer costs per frame.
        big = isinstance(dst, HboneEnd)
        size = HBONE_CHUNK if big else CHUNK
        pool = _big_pool if big else _pool
        buf: bytearray | None = None
        view = memoryview(b"")
        # Out of an HBONE stream into a socket: while this pump waits, the connection's reader
        # writes arriving DATA straight to the socket (no wake-up of this task per message).
        sink = None
        if isinstance(src, HboneEnd) and isinstance(dst, SockEnd):
            sock_end = dst

            def direct(data: bytes) -> int:
                taken = sock_end.try_write(data)
                if taken:
                    active()
                    if upstream_dir:
                        result.sent += taken
                    else:
                        result.received += taken
                return taken

            sink = direct
        try:
            while True:
                if buf is None:
                    buf = pool.pop() if pool else bytearray(size)
                    view = memoryview(buf)
                n = src.try_read(view)
                if n < 0:
                    # Nothing ready: give the buffer back while this connection waits.
                    if len(pool) < POOL_SIZE:
                        pool.append(buf)
                    buf = None
                    await wait(src, n, sink)
                    unyielded = 0
                    continue
                active()
                if n == 0:
                    # Half-close: pass the FIN on and keep the other direction flowing.
                    await dst.send_eof()
                    return
                await dst.write(view[:n])
                if upstream_dir:
                    result.sent += n
                else:
                    result.received += n
                unyielded += 1
                if src.drained(n, len(view)):
                    if len(pool) < POOL_SIZE:
                        pool.append(buf)
                    buf = None
                    await wait(src, WANT_READ, sink)
                    unyielded = 0
                elif unyielded >= YIELD_EVERY:
                    unyielded = 0
                    await trio.lowlevel.checkpoint()
        except _BROKEN as exc:
            fail(exc)
        finally:
            if buf is not None and len(pool) < POOL_SIZE:
                pool.append(buf)

    try:
        # One pump in a new task, the other in this one: a connection costs one task spawn.
        down, up = ends
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            if timed:
                scope.deadline = trio.current_time() + idle_timeout
            if down is not None and up is not None:
                nursery.start_soon(fast_pump, up, down, False)
                await fast_pump(down, up, True)
            else:
                nursery.start_soon(pump, upstream, client, False)
                await pump(client, upstream, True)
        if scope.cancelled_caught and not result.error:
            result.error = f"idle for {idle_timeout:g}s"
    finally:
        # Shielded: under cancellation the first aclose's checkpoint would raise before the
        # second socket was closed.
        with trio.CancelScope(shield=True):
            await client.aclose()
            await upstream.aclose()
    return result
