"""The sandbox's edge to the system: `ip` commands, network namespaces, processes.

Processes are tracked by (pid, start time) so a recycled pid is never signalled, and are
stopped by pid or process group only. A namespace is only deleted after every process still
inside it is gone (otherwise the kernel keeps it, and its links, alive).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.sandbox.errors import SandboxError

NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 30.0


def run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, what: str = "") -> str:
    """Run a short command; its failure is a SandboxError naming the command and its stderr."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise SandboxError(f"{what or ' '.join(argv)}: timed out after {timeout:.0f}s") from e
    except OSError as e:
        raise SandboxError(f"{what or ' '.join(argv)}: cannot run {argv[0]}: {e.strerror}") from e
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise SandboxError(f"{what or ' '.join(argv)}: {msg}")
    return proc.stdout


def ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return run(argv, what=" ".join(argv))


def netns_list() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_add(name: str) -> None:
    if netns_exists(name):
        raise SandboxError(f"network namespace {name!r} already exists")
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def netns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(name: str) -> list[int]:
    """Every process whose network namespace is `name` (found through /proc/<pid>/ns/net)."""
    ident = netns_inode(name)
    if ident is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            found.append(int(entry.name))
    return found


def netns_delete(name: str, *, grace: float = 5.0) -> None:
    """Stop whatever still runs inside, then delete the namespace. Missing is fine."""
    if not netns_exists(name):
        return
    pids = pids_in_netns(name)
    if pids:
        stop_all([ProcessRef.of(p) for p in pids], grace=grace)
    ip("netns", "delete", name)


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A process we started, identified by pid AND start time (pids are recycled)."""

    pid: int
    start_time: int

    @staticmethod
    def of(pid: int) -> ProcessRef:
        return ProcessRef(pid, _start_time(pid) or 0)

    def alive(self) -> bool:
        stat = _stat(self.pid)
        if stat is None:
            return False
        state, start = stat
        return state not in ("Z", "X") and (self.start_time == 0 or start == self.start_time)

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @staticmethod
    def from_json(doc: object) -> ProcessRef | None:
        if not isinstance(doc, dict):
            return None
        pid, start = doc.get("pid"), doc.get("start_time")
        if not isinstance(pid, int) or not isinstance(start, int):
            return None
        return ProcessRef(pid, start)


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def spawn(
    argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], ProcessRef]:
    """Start a background process in its own session (process group = its pid), output to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        except OSError as e:
            raise SandboxError(f"cannot start {argv[0]}: {e.strerror}") from e
    return proc, ProcessRef(proc.pid, _start_time(proc.pid) or 0)


def _signal(ref: ProcessRef, sig: signal.Signals, group: bool) -> None:
    if not ref.alive():
        return
    try:
        if group:
            try:
                os.killpg(ref.pid, sig)
                return
            except ProcessLookupError:
                pass  # not a group leader (any more): signal the process itself
        os.kill(ref.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(
    refs: Iterable[ProcessRef],
    *,
    grace: float = 10.0,
    group: bool = False,
    children: dict[int, subprocess.Popen[bytes]] | None = None,
    first: signal.Signals = signal.SIGTERM,
) -> None:
    """`first` (SIGTERM), wait up to `grace` seconds, then SIGKILL what is left; reap our own
    children."""
    refs = list(refs)
    for r in refs:
        _signal(r, first, group)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap(children)
        if not any(r.alive() for r in refs):
            break
        time.sleep(0.05)
    for r in refs:
        _signal(r, signal.SIGKILL, group)
    kill_deadline = time.monotonic() + 5.0
    while time.monotonic() < kill_deadline:
        reap(children)
        if not any(r.alive() for r in refs):
            break
        time.sleep(0.02)


def reap(children: dict[int, subprocess.Popen[bytes]] | None) -> None:
    """Collect the exit status of those of our children that have ended."""
    if not children:
        return
    for pid, proc in list(children.items()):
        if proc.poll() is not None:
            del children[pid]
