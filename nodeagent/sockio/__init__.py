"""Socket I/O without trio's per-call scheduler round trips, for every byte mover of the agent.

trio's stream methods yield to the scheduler at least once per call (two for a plain
`SocketStream.send_all`) even when the kernel could take or give the bytes at once, and allocate
a `bytes` per read. The L4 relay (`proxy/relay.py`) and the HTTP proxy (`http/`) move bytes
through the same two "ends" instead (`ends.py`): a `trio.SocketStream` driven through its file
descriptor and a tunnel `HboneStream` (one CONNECT stream) through its no-checkpoint
primitives. An operation that can complete now does so; it waits only on EAGAIN / WANT_READ /
WANT_WRITE, or for a frame (the cancellation point).
`FastIO` (`fastio.py`) gives those ends the `receive_some`/`send_all` shape the HTTP codecs use,
with a checkpoint every `YIELD_EVERY` operations that did not wait, so a connection that always
has bytes ready cannot starve the others.
"""

from nodeagent.sockio.ends import YIELD_EVERY, End, HboneEnd, SockEnd, end_of
from nodeagent.sockio.fastio import FastIO

__all__ = ["YIELD_EVERY", "End", "FastIO", "HboneEnd", "SockEnd", "end_of"]
