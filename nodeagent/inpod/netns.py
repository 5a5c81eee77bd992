"""An open handle on a pod's network namespace: run code in it, create sockets in it.

A network namespace is a per-thread attribute (`setns(fd, CLONE_NEWNET)` moves only the calling
thread), and a socket belongs for its whole life to the namespace it was created in. So the agent
never *lives* in a pod netns: `Netns.run` enters the namespace in the calling thread, runs one
synchronous function, and restores the thread's original namespace before returning, and
`Netns.socket` does the same around `socket()`. Entering and leaving costs two `setns` calls
(a few µs, see docs/redirection.md), which keeps one socket per outbound connection cheap and
lets any thread (trio's main thread, a trio worker thread) do it.

We chose restore-in-place over a dedicated worker thread per namespace: no thread per pod, no
cross-thread hop per socket. The price is that restoring must never fail: if it does, the thread
would go on serving other pods from the wrong namespace, so the process aborts instead (ztunnel
panics in the same place). Restoring can only fail if the process lost CAP_SYS_ADMIN meanwhile.

The handle keeps its fd open, so the namespace stays alive and stays *the same* namespace even if
its path is removed and re-created; `identity` ((st_dev, st_ino) of the nsfs inode) tells two
namespaces apart and `path_matches()` detects a re-created path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket as _socket
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from nodeagent.contract import MESH_MARK
from nodeagent.inpod.errors import NetnsError
from nodeagent.inpod.sockopt import IP_BIND_ADDRESS_NO_PORT, IP_TRANSPARENT
from nodeagent.log import get_logger

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), <linux/nsfs.h>
_log = get_logger("inpod.netns")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_nsfd(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Checked here because setns on a plain file or another namespace type only fails
        # later, with a vaguer EINVAL.
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            nstype = None
        if nstype != CLONE_NEWNET:
            raise NetnsError(f"open netns {path}: not a network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


_home = threading.local()


def _home_fd(name: str) -> int:
    """This thread's own netns, opened once per thread and kept: the thread is always back
    in it between our calls (that is the invariant `_entered` keeps), so it never changes."""
    fd: int | None = getattr(_home, "fd", None)
    if fd is None:
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetnsError(
                f"enter netns {name}: save current netns: {e.strerror}", errno=e.errno
            ) from None
        # Closed when the thread ends (the thread-local's value is dropped with it).
        _home.fd = fd
        _home.closer = _FdCloser(fd)
    return fd


class _FdCloser:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


def _restore(home: int, name: str) -> None:
    try:
        _setns(home)
    except OSError as e:  # pragma: no cover - needs losing CAP_SYS_ADMIN mid-flight
        _log.critical("netns.restore.failed", netns=name, error=e.strerror)
        os.abort()


@contextlib.contextmanager
def _entered(fd: int, name: str) -> Iterator[None]:
    """Enter the namespace `fd` in this thread for the duration of the block, then restore."""
    home = _home_fd(name)
    try:
        _setns(fd)
    except OSError as e:
        raise NetnsError(f"enter netns {name}: {e.strerror}", errno=e.errno) from None
    try:
        yield
    finally:
        _restore(home, name)


class Netns:
    """An open network namespace: from a path (/run/netns/x, /proc/PID/ns/net) or an fd."""

    def __init__(self, fd: int, name: str, path: str | None) -> None:
        st = os.fstat(fd)
        self._fd = fd
        self.name = name
        self.path = path
        self.identity: tuple[int, int] = (st.st_dev, st.st_ino)

    @classmethod
    def open(cls, path: str) -> Netns:
        try:
            fd = _open_nsfd(path)
        except OSError as e:
            raise NetnsError(f"enter netns {path}: {e.strerror}", errno=e.errno) from None
        return cls(fd, path, path)

    @classmethod
    def from_fd(cls, fd: int, *, name: str | None = None) -> Netns:
        """Wrap a namespace fd (e.g. received over a unix socket); the caller keeps its own fd."""
        label = name or f"fd:{fd}"
        try:
            return cls(_open_nsfd(f"/proc/self/fd/{fd}"), label, None)
        except OSError as e:
            raise NetnsError(f"enter netns {label}: {e.strerror}", errno=e.errno) from None

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise NetnsError(f"netns {self.name}: handle is closed", errno=errno.EBADF)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Netns({self.name!r}, identity={self.identity})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Netns) and other.identity == self.identity

    def __hash__(self) -> int:
        return hash(self.identity)

    def path_matches(self) -> bool:
        """Whether `path` still names this namespace (False once deleted or re-created)."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def run(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """Run `fn(*args)` in this thread with the namespace entered; blocks while it runs."""
        with _entered(self.fd, self.name):
            return fn(*args)

    async def arun(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """`run` in a trio worker thread (the worker is back in its own netns afterwards)."""
        return await trio.to_thread.run_sync(self._run_star, fn, args)

    def _run_star(self, fn: Callable[[Unpack[Ts]], T], args: tuple[*Ts]) -> T:
        return self.run(fn, *args)

    def socket(
        self,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,
        *,
        mark: int = MESH_MARK,
        transparent: bool = False,
    ) -> _socket.socket:
        """A non-blocking socket created inside this namespace, with SO_MARK (0 = none) and
        IP_TRANSPARENT (needed to bind a non-local source address) as asked.

        A transparent socket also gets IP_BIND_ADDRESS_NO_PORT: a bind to (peer ip, 0) leaves
        the port to `connect`, which needs it unique per 4-tuple only. Without it the bind
        itself searches for a port no socket of that ip holds, TIME_WAIT ones included: at
        1,000 inbound connections/s that search took milliseconds per bind and then ran out
        of ports (docs/redirection.md, "Source ports of transparent connections")."""
        fd, home = self.fd, _home_fd(self.name)
        try:
            _setns(fd)
        except OSError as e:
            raise NetnsError(f"enter netns {self.name}: {e.strerror}", errno=e.errno) from None
        try:
            sock = _socket.socket(family, type | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
        except OSError as e:
            raise NetnsError(f"socket in netns {self.name}: {e.strerror}", errno=e.errno) from None
        finally:
            _restore(home, self.name)
        try:
            if mark:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_MARK, mark)
            if transparent:
                sock.setsockopt(_socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.setsockopt(_socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError as e:
            sock.close()
            raise NetnsError(
                f"socket in netns {self.name}: set mark/transparent: {e.strerror}", errno=e.errno
            ) from None
        return sock
