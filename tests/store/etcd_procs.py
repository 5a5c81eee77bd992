"""Real etcd servers for the store tests, on loopback.

etcd runs from the Debian package (`etcd`), on free loopback ports with a temporary data dir;
every process is killed by pid and its dir removed at teardown, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETCD_START_TIMEOUT = 15.0


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
            pytest.fail(
                "the etcd tests need the `etcd` binary (Debian etcd-server); run scripts/bootstrap"
            )
        cmd = [
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
            # fast elections keep the failover test short
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", str(self.log_path),
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

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

    def wait_ready(self, ssl_context: object = None) -> None:
        deadline = time.monotonic() + ETCD_START_TIMEOUT
        for m in self.members:
            while True:
                if m.proc is not None and m.proc.poll() is not None:
                    pytest.fail(f"etcd {m.name} exited with {m.proc.returncode}:\n{m.log_tail()}")
                try:
                    with urllib.request.urlopen(  # loopback only
                        f"{m.client_url}/health", timeout=1, context=ssl_context
                    ) as resp:
                        if json.loads(resp.read()).get("health") == "true":
                            break
                except (OSError, urllib.error.URLError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"etcd {m.name} not healthy in {ETCD_START_TIMEOUT}s:\n{m.log_tail()}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(
    size: int, *, scheme: str = "http", extra: list[str] | None = None
) -> EtcdCluster:
    root = Path(tempfile.mkdtemp(prefix="etcd-test-"))
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
