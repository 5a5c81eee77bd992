"""Certificate rotation under live traffic, on a 2-node sandbox whose CA issues 12-second SVIDs.

Both agents renew their workloads' certificates at half-life (about every 5 s here). A
connection opened before a rotation keeps its TLS session and goes on carrying bytes across
several rotations; new connections after them use the new certificates.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mesh_helpers import admin, apply, eventually, sandbox_fixture
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("rot", ca_ttl="12s")
VIP = "10.96.78.10"
TD = "cluster.local"

# A line echo server on 9000.
ECHO = r"""
import socketserver
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 9000), Echo).serve_forever()
"""

# One connection, one line per 0.5 s for `seconds`; prints how many echoes came back intact.
TALKER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9000), timeout=5)
f = s.makefile("rwb")
ok, end, i = 0, time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    line = f"ping {i}\n".encode()
    f.write(line); f.flush()
    ok += f.readline() == line
    i += 1
    time.sleep(0.5)
print(f"{ok}/{i}")
"""


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pod, Pod, Path]:
    d = tmp_path_factory.mktemp("rotation")
    (d / "echo.py").write_text(ECHO)
    (d / "talker.py").write_text(TALKER)
    server = sandbox.pod_add(
        "n2", "shop", "echo", ["python3", str(d / "echo.py")],
        service_account="echo", labels={"app": "echo"},
    )  # fmt: skip
    client = sandbox.pod_add("n1", "shop", "talker", ["sleep", "600"], service_account="talker")
    svc = service("echo", namespace="shop", cluster_ip=VIP, port_name="tcp-echo", port=9000,
                  target=9000)  # fmt: skip
    apply(sandbox, d, "svc", [svc])
    return server, client, d


def certs(sb: Sandbox, node: str) -> dict[str, Any]:
    return {row["identity"]: row for row in admin(sb, node, "/certs")}


def serial(sb: Sandbox, node: str, sa: str) -> str | None:
    row = certs(sb, node).get(f"spiffe://{TD}/ns/shop/sa/{sa}")
    return str(row["serial"]) if row and row.get("serial") else None


def test_rotation_keeps_established_connections(
    sandbox: Sandbox, pods: tuple[Pod, Pod, Path]
) -> None:
    _, client, d = pods

    # the service must be reachable before the long connection starts
    def echoes() -> bool:
        probe = sandbox.exec(client, ["python3", str(d / "talker.py"), VIP, "0.1"], timeout=15)
        return probe.returncode == 0 and probe.stdout.strip() == "1/1"

    eventually(echoes, "echo answers through the mesh", timeout=20)

    seen_client = {serial(sandbox, "n1", "talker")}
    seen_server = {serial(sandbox, "n2", "echo")}
    talker = sandbox.popen(
        client, ["python3", str(d / "talker.py"), VIP, "14"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while talker.poll() is None:
            seen_client.add(serial(sandbox, "n1", "talker"))
            seen_server.add(serial(sandbox, "n2", "echo"))
            time.sleep(0.5)
        out, err = talker.communicate(timeout=10)
    finally:
        if talker.poll() is None:
            talker.kill()
            talker.wait()
    seen_client.discard(None)
    seen_server.discard(None)
    # at least two rotations on each side while the one connection was open
    assert len(seen_client) >= 3, f"client certificates seen: {seen_client}"
    assert len(seen_server) >= 3, f"server certificates seen: {seen_server}"
    assert talker.returncode == 0, err
    sent = int(out.strip().split("/")[1])
    assert out.strip() == f"{sent}/{sent}", f"{out} {err}"
    assert sent >= 20
    # and a new connection uses the current certificates
    again = sandbox.exec(client, ["python3", str(d / "talker.py"), VIP, "0.1"], timeout=15)
    assert again.stdout.strip() == "1/1", again.stderr
