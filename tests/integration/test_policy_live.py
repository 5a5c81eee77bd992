"""Policy applies to connections already open, on a 2-node sandbox (real agents, CA, store).

A client pod on n1 keeps ONE HTTP/1.1 connection to a service VIP (its agent's L7 proxy pools
the mTLS tunnel to the backend on n2): 200, then a DENY AuthorizationPolicy is applied and the
next requests on that same client connection get 403 `RBAC: access denied` within a couple of
seconds (the port is HTTP: the destination agent authorizes every request against its current
snapshot, on the same pooled tunnel). A pod outside the mesh keeps a plaintext keep-alive
connection to the backend's HTTP port; a switch to STRICT closes it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from l7_helpers import write_app
from mesh_helpers import apply, client_pods, eventually, meshctl, sandbox_fixture
from snapshot_docs import service

from nodeagent.admin.client import admin_json_sync
from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("pl")
VIP = "10.96.83.10"

# One TCP connection, one GET per stdin line; prints "<status> <body>" or "closed"/"error <E>"
# and stops at the first failure, so every answer came over the same connection.
CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
f = s.makefile("rb")
print("connected", s.getsockname()[1], flush=True)
for line in sys.stdin:
    try:
        s.sendall(f"GET /{line.strip()} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status = f.readline()
        if not status:
            print("closed", flush=True); break
        code, length = int(status.split()[1]), 0
        while (h := f.readline()) not in (b"\r\n", b""):
            k, _, v = h.decode().partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
        print(code, f.read(length).decode(errors="replace").strip(), flush=True)
    except OSError as e:
        print("error", type(e).__name__, flush=True); break
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("policy-live")
    (d / "client.py").write_text(CLIENT)
    return d


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    app = write_app(files)
    server = sandbox.pod_add(
        "n2", "shop", "web", [*app, "web", "8080"], service_account="web", labels={"app": "web"}
    )
    client, outsider = client_pods(sandbox)
    svc = service("web", namespace="shop", cluster_ip=VIP)
    apply(sandbox, files, "service", [svc])
    return {"server": server, "client": client, "outsider": outsider}


class KeepAlive:
    """The CLIENT script in a pod: one connection, a request per `get()`."""

    def __init__(self, sb: Sandbox, pod: Pod, files: Path, host: str, port: int) -> None:
        self.proc = sb.popen(
            pod,
            ["python3", str(files / "client.py"), host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = self._line()
        assert first.startswith("connected"), first

    def _line(self) -> str:
        assert self.proc.stdout is not None
        # The script's socket timeout (5 s) bounds every answer; a dead script gives "".
        return self.proc.stdout.readline().strip()

    def get(self, path: str = "") -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def curl_code(sb: Sandbox, pod: Pod, url: str) -> str:
    r = sb.exec(pod, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                      url], timeout=10)  # fmt: skip
    return str(r.stdout)


def wait_refusal(sb: Sandbox, path: str) -> str:
    """The `response_code_details` of n2's access-log line for a refused `path` (written by a
    queue: polled)."""
    found: list[str] = []

    def seen() -> bool:
        for line in sb.node("n2").agent_log.read_text(errors="replace").splitlines():
            if '"access.request"' in line and '"UAEX"' in line:
                doc = json.loads(line[line.index("{") :])
                if doc.get("path") == path and doc.get("reporter") == "destination":
                    found.append(str(doc["response_code_details"]))
        return bool(found)

    eventually(seen, f"n2's access-log line for {path}")
    return found[-1]


def admin_pod_stats(sb: Sandbox, node: str, name: str) -> dict[str, Any]:
    found = {p["name"]: p for p in admin_json_sync(sb.node(node).admin_socket, "/pods", timeout=5)}
    return dict(found[name]["connections"])


def test_deny_reaches_a_pooled_l7_connection(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    client = pods["client"]
    eventually(lambda: curl_code(sandbox, client, f"http://{VIP}/") == "200", "VIP served")
    conn = KeepAlive(sandbox, client, files, VIP, 80)
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-sleep", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}],
        },
    }
    path: Path | None = None
    try:
        assert conn.get("before").startswith("200 version=web"), "first request"
        assert conn.get("pooled").startswith("200 version=web"), "second request, pooled tunnel"
        path = apply(sandbox, files, "deny", [deny])
        applied = time.monotonic()
        answers = []
        while time.monotonic() - applied < 5:
            answer = conn.get("after")
            answers.append(answer)
            if answer.startswith("403"):
                break
            # Before the policy reaches n2 the pooled tunnel still serves (200); a request in
            # flight when it is closed gets 503. Anything else is a bug.
            assert answer.startswith(("200", "503")), answers
            time.sleep(0.1)
        took = time.monotonic() - applied
        assert answers[-1] == "403 RBAC: access denied", answers
        assert took < 2.5, (took, answers)
        # Same client connection, still denied.
        assert conn.get("again") == "403 RBAC: access denied"
        # Refused by n2's per-request authorization, naming the DENY policy.
        assert wait_refusal(sandbox, "/again") == (
            "rbac_access_denied_matched_policy[ns[shop]-policy[deny-sleep]-rule[0]]"
        )
    finally:
        conn.close()
        if path is not None:
            meshctl(sandbox, "delete", "-f", str(path))
    eventually(lambda: curl_code(sandbox, client, f"http://{VIP}/") == "200", "allowed again")


def test_strict_closes_an_open_plaintext_connection(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    server, outsider = pods["server"], pods["outsider"]
    direct = f"http://{server.ip}:8080/"
    eventually(lambda: curl_code(sandbox, outsider, direct) == "200", "PERMISSIVE accepts")
    conn = KeepAlive(sandbox, outsider, files, server.ip, 8080)
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    path: Path | None = None
    try:
        assert conn.get("plain").startswith("200 version=web")
        path = apply(sandbox, files, "strict", [strict])
        applied = time.monotonic()
        answers = []
        while time.monotonic() - applied < 5:
            answer = conn.get("plain")
            answers.append(answer)
            if not answer.startswith("200"):
                break
            time.sleep(0.1)
        took = time.monotonic() - applied
        assert answers[-1] == "closed" or answers[-1].startswith("error"), answers
        assert took < 2.5, (took, answers)
        n2 = admin_pod_stats(sandbox, "n2", "web")["inbound"]
        assert n2["closed_by_policy"] >= 1, n2
    finally:
        conn.close()
        if path is not None:
            meshctl(sandbox, "delete", "-f", str(path))
    eventually(lambda: curl_code(sandbox, outsider, direct) == "200", "PERMISSIVE again")
