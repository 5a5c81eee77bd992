"""Wake on any process's commit to a SQLite file: inotify on its write-ahead log (Linux).

Every commit in WAL mode appends frames to `<db>-wal`, whichever process makes it, so an
`IN_MODIFY` watch on that file turns "has anyone written?" from a periodic question into an
event: an idle agent's watches sleep in the kernel instead of waking 40 times a second. inotify
is reached through libc with ctypes (the stdlib has no binding); where it is not available
`WalWatch.open` returns None and the store falls back to looking every `POLL_INTERVAL`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import trio

_IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


class WalWatch:
    """An inotify descriptor watching one file for writes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._closed = False

    @classmethod
    def open(cls, path: str) -> WalWatch | None:
        """A watch of `path` (which must exist), or None where inotify is not available."""
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            os.close(fd)
            return None
        return cls(fd)

    async def wait_written(self) -> None:
        """Until the file is written (perhaps before this call: events queue in the kernel).
        Raises trio.ClosedResourceError when `close` is called meanwhile."""
        await trio.lowlevel.wait_readable(self._fd)
        self._drain()

    def _drain(self) -> None:
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
