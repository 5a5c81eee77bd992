"""Who runs in an agent's run dir: the agent's pid file and the uninstall lock.

The running agent holds an exclusive flock on `<run-dir>/agent.pid` (which names its pid) for its
whole life; `nodeagent uninstall` holds one on `<run-dir>/uninstall.lock` while it works. A lock
goes with its process, so a file left by a crash never blocks anyone, and a reused pid is never
mistaken for the agent. The agent reads the uninstall lock to tell an uninstall (stop, re-create
nothing) from a lost lease (register again).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path

PID_FILE = "agent.pid"
UNINSTALL_LOCK = "uninstall.lock"


class RunDirBusy(Exception):
    """Another process holds the lock (an agent runs, or an uninstall is under way)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


@dataclass(slots=True)
class HeldLock:
    path: Path
    fd: int

    def release(self) -> None:
        """Remove the file, then let the lock go (closing the fd)."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _take(path: Path, what: str) -> HeldLock:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise RunDirBusy(f"{what} already runs (pid {pid}, {path})", pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return HeldLock(path, fd)


def _holder(path: Path) -> int | None:
    """The pid holding `path`'s lock (0 if unreadable), or None when nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)  # also drops a lock just taken
    return None


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except ValueError:
        return 0


def take_agent_pid_file(run_dir: Path) -> HeldLock:
    """For `nodeagent run`: RunDirBusy when another agent or an uninstall holds the run dir."""
    uninstalling = _holder(run_dir / UNINSTALL_LOCK)
    if uninstalling is not None:
        raise RunDirBusy(
            f"`nodeagent uninstall` (pid {uninstalling}) is removing the mesh from {run_dir}",
            uninstalling,
        )
    return _take(run_dir / PID_FILE, "an agent")


def take_uninstall_lock(run_dir: Path) -> HeldLock:
    return _take(run_dir / UNINSTALL_LOCK, "an uninstall")


def running_agent(run_dir: Path) -> int | None:
    """The pid of the agent running in `run_dir`, or None."""
    return _holder(run_dir / PID_FILE)


def uninstall_under_way(run_dir: Path) -> bool:
    return _holder(run_dir / UNINSTALL_LOCK) is not None


def stop_and_wait(pid: int, timeout: float) -> bool:
    """SIGTERM `pid` and wait for it to exit (on a pidfd: the exit itself, no polling); False
    when it still runs after `timeout` seconds (blocking: run it in a thread)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)
