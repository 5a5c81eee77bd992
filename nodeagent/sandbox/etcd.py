"""Real etcd clusters on loopback, for the store tests and the fan-out bench.

etcd runs from the Debian package (`etcd-server`) on free loopback ports with a temporary data
dir (on tmpfs when asked: a shared machine's disk would make fsync latency the figure); every
member is killed by pid and the dir removed by `stop`, also when start-up fails. The sandbox's
own etcd (one member in its netns, detached from the CLI) is started by `sandbox.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 20.0


class EtcdError(RuntimeError):
    """etcd is missing, exited, or did not become healthy; the message says which member."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    scheme: str = "http"
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, initial_cluster: str, state: str = "new") -> None:
        if shutil.which("etcd") is None:
            raise EtcdError("no `etcd` binary (Debian etcd-server); run scripts/bootstrap")
        argv = [
            "etcd",
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", f"t-{self.data_dir.parent.name}",
            "--logger", "zap",
            "--log-outputs", str(self.log_path),
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def healthy(self, ssl_context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(  # loopback only
                f"{self.client_url}/health", timeout=1, context=ssl_context
            ) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return "(no log)"


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    root: Path

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def url_from(self, first: int, query: str = "") -> str:
        """The URL with member `first` first (a client talks to it until it fails)."""
        order = self.members[first:] + self.members[:first]
        return "etcd://" + ",".join(m.endpoint for m in order) + (f"?{query}" if query else "")

    @property
    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members if m.proc is not None]

    def wait_ready(
        self, ssl_context: ssl.SSLContext | None = None, timeout: float = START_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        for m in self.members:
            while not m.healthy(ssl_context):
                if m.proc is not None and m.proc.poll() is not None:
                    raise EtcdError(
                        f"etcd {m.name} exited with {m.proc.returncode}:\n{m.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise EtcdError(f"etcd {m.name} not healthy in {timeout} s:\n{m.log_tail()}")
                time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system CPU of every member so far (from /proc)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return total

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.kill()
        shutil.rmtree(self.root, ignore_errors=True)


FAST_ELECTIONS = ["--heartbeat-interval", "50", "--election-timeout", "500"]


def start_cluster(
    size: int,
    *,
    scheme: str = "http",
    extra: list[str] | None = None,
    tmpfs: bool = False,
    prefix: str = "etcd-",
) -> EtcdCluster:
    """`size` members started (not yet healthy: call `wait_ready`). EtcdError if one cannot
    start; what did start is stopped and removed first."""
    shm = "/dev/shm" if tmpfs and os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    members = [
        EtcdMember(
            name=f"m{i}",
            client_port=free_port(),
            peer_port=free_port(),
            data_dir=root / f"m{i}",
            log_path=root / f"m{i}.log",
            scheme=scheme,
            extra=list(extra or []),
        )
        for i in range(size)
    ]
    cluster = EtcdCluster(members, root)
    initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in members)
    try:
        for m in members:
            m.start(initial)
    except BaseException:
        cluster.stop()
        raise
    return cluster
