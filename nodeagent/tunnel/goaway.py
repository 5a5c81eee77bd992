"""The graceful GOAWAY of RFC 9113 §6.8, which h2 does not do, and the drain that sends it.

h2 (4.x; python-hyper/h2#1181, open since 2019) moves the whole connection to CLOSED once a
GOAWAY is sent or received: every later frame, in or out, is a ProtocolError, and a received
GOAWAY also throws away what was queued to send. So a server could not drain (let the streams
under way finish while new ones go elsewhere), and a client whose server drains (ours at a
restart, an app's gRPC server at its max connection age) lost the streams the GOAWAY covers.
RFC 9113 §6.8: a GOAWAY stops new streams; those at or below its last stream id "might still
complete successfully".

`GracefulH2Connection` keeps h2's connection state open for a GOAWAY with NO_ERROR, both ways:

- `announce_goaway()` sends one (its last stream id: the highest the peer opened) and leaves the
  connection open; the caller refuses streams the peer opens after it (REFUSED_STREAM) and sends
  the final GOAWAY (`close_connection()`) once its streams ended, as before;
- a received one only reports `ConnectionTerminated`: the caller opens no new stream and fails
  those above the id as refused (never processed, so safe to retry elsewhere).

A GOAWAY with an error code still closes the connection at once, as h2 does.

`DrainSet` holds a server's open connections so that a drain (a graceful restart) announces the
GOAWAY on all of them, and on any accepted after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, TypeVar

import h2.connection
import h2.errors
import h2.events
from hyperframe.frame import Frame, GoAwayFrame


class GracefulH2Connection(h2.connection.H2Connection):
    """h2's connection, except that a GOAWAY with NO_ERROR leaves it open (module docstring)."""

    def announce_goaway(self) -> None:
        """Queue a graceful GOAWAY (no new streams; those the peer opened so far go on)."""
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=self.highest_inbound_stream_id,
            error_code=h2.errors.ErrorCodes.NO_ERROR,
        )
        self._prepare_for_sending([frame])

    @property
    def closed(self) -> bool:
        """h2 sends nothing more (a final GOAWAY went either way, or an error closed it)."""
        return self.state_machine.state is h2.connection.ConnectionState.CLOSED

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class Drainable(Protocol):
    def drain(self) -> None: ...


D = TypeVar("D", bound=Drainable)


class DrainSet:
    """A server's open connections; `drain()` asks each to drain (and each one added later)."""

    def __init__(self) -> None:
        self.on = False
        self._conns: set[Drainable] = set()

    def __len__(self) -> int:
        return len(self._conns)

    def drain(self) -> None:
        self.on = True
        for conn in list(self._conns):
            conn.drain()

    @contextlib.contextmanager
    def serving(self, conn: D) -> Iterator[D]:
        """Hold `conn` in the set while it is served."""
        self._conns.add(conn)
        if self.on:
            conn.drain()
        try:
            yield conn
        finally:
            self._conns.discard(conn)
