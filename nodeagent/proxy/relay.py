"""Copy bytes both ways between two streams: half-close aware, bounded, with an idle timeout.

Each direction owns one fixed-size read, so a slow reader back-pressures the writer instead of
making the agent buffer without limit. An error on either side ends both directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

CHUNK = 64 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


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
) -> RelayResult:
    """Relay until both directions have seen EOF, an error, or `idle_timeout` of silence.

    Counts go into `result` as bytes move (pass one in to keep them if the relay is cancelled).
    """
    result = result if result is not None else RelayResult()
    deadline = [trio.current_time() + idle_timeout]

    async def pump(
        src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream, upstream_dir: bool
    ) -> None:
        try:
            while True:
                data = await src.receive_some(CHUNK)
                deadline[0] = trio.current_time() + idle_timeout
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
            result.error = result.error or f"{type(exc).__name__}: {exc}"
            nursery.cancel_scope.cancel()

    async def watchdog() -> None:
        while True:
            await trio.sleep_until(deadline[0])
            if trio.current_time() >= deadline[0]:
                result.error = f"idle for {idle_timeout:g}s"
                nursery.cancel_scope.cancel()
                return

    try:
        async with trio.open_nursery() as nursery:
            if idle_timeout != math.inf:
                nursery.start_soon(watchdog)
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, client, upstream, True)
                pumps.start_soon(pump, upstream, client, False)
            nursery.cancel_scope.cancel()
    finally:
        # Shielded: under cancellation the first aclose's checkpoint would raise before the
        # second socket was closed.
        with trio.CancelScope(shield=True):
            await client.aclose()
            await upstream.aclose()
    return result
