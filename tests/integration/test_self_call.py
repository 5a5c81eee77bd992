"""Connections aimed at the agent's own listeners are refused at once (issue 21, item 1).

On a 2-node sandbox, with real curl from pods and nodes: a meshed app calling another pod's and
its own `:15006`, `127.0.0.1:15001` and its own pod IP on 15001 and 15008, and plaintext
clients on both nodes calling `<pod IP>:15006`. Before the fix each of these made the agent
connect to its own listener again and again (fds ~25 → 2,000 in a second, then accept failures
for every pod on the node). Checked: every call fails promptly, the agents' open fd counts stay
bounded, `istio_self_calls_refused_total` counts the refusals on the agent that refused, and an
ordinary request from another pod succeeds between the attacks and after them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mesh_helpers import client_pods, curl, eventually, sandbox_fixture

from nodeagent.contract import (
    INBOUND_PLAINTEXT_PORT,
    METRICS_PATH,
    METRICS_PORT,
    OUTBOUND_CAPTURE_PORT,
    TUNNEL_PORT,
)
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry import exposition

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("sc")

APP = r"""
import socketserver
class Http(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        self.wfile.write(head + b"ok\n")
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Http).serve_forever()
"""
PROMPT_S = 2.0  # a refusal is a reset or an empty reply, not curl's 3 s timeout
FD_SLACK = 64  # what ordinary requests and the sandbox's own polling may hold open meanwhile


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pod]:
    d = tmp_path_factory.mktemp("self_call")
    (d / "app.py").write_text(APP)
    server = sandbox.pod_add(
        "n2", "shop", "web", ["python3", str(d / "app.py")],
        service_account="web", labels={"app": "web"},
    )  # fmt: skip
    client, _ = client_pods(sandbox)
    return {"server": server, "client": client}


def open_fds(sb: Sandbox, node: str) -> int:
    pid = sb.node(node).agent_pid
    assert pid is not None, f"no agent on {node}"
    return len(os.listdir(Path(f"/proc/{pid}/fd")))


def refused(sb: Sandbox, node: str) -> dict[str, float]:
    """istio_self_calls_refused_total of `node`'s agent, by listener."""
    url = f"http://127.0.0.1:{METRICS_PORT}{METRICS_PATH}"
    r = sb.exec(f"node/{node}", ["curl", "-sf", "--max-time", "5", url], timeout=10)
    assert r.returncode == 0, f"scrape {node}: curl {r.returncode}"
    family = exposition.parse(str(r.stdout)).get("istio_self_calls_refused_total")
    out: dict[str, float] = {}
    for s in family.samples if family is not None else ():
        out[s.labels["listener"]] = out.get(s.labels["listener"], 0) + s.value
    return out


def test_calls_to_the_agents_own_listeners_fail_fast_and_are_counted(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    server, client = pods["server"], pods["client"]
    ordinary = f"http://{server.ip}:8080/"
    eventually(lambda: curl(sandbox, client, ordinary) == (0, "ok\n"), "ordinary mesh request")
    before = {n: open_fds(sandbox, n) for n in ("n1", "n2")}
    counted = {n: refused(sandbox, n) for n in ("n1", "n2")}
    attacks: list[tuple[str | Pod, str, str]] = [
        # (who calls, URL, the node whose agent refuses it: the caller's for a meshed pod, on
        # whichever listener the connection reaches first; the pod's for a plaintext node)
        (client, f"http://{server.ip}:{INBOUND_PLAINTEXT_PORT}/", "n1"),
        (client, f"http://{client.ip}:{INBOUND_PLAINTEXT_PORT}/", "n1"),
        (client, f"http://127.0.0.1:{OUTBOUND_CAPTURE_PORT}/", "n1"),
        (client, f"http://{client.ip}:{OUTBOUND_CAPTURE_PORT}/", "n1"),
        (client, f"http://{server.ip}:{TUNNEL_PORT}/", "n1"),
        ("node/n1", f"http://{server.ip}:{INBOUND_PLAINTEXT_PORT}/", "n2"),
        ("node/n2", f"http://{server.ip}:{INBOUND_PLAINTEXT_PORT}/", "n2"),
    ]
    expected = {"n1": 0, "n2": 0}
    for caller, url, node in attacks:
        started = time.monotonic()
        rc, body = curl(sandbox, caller, url)
        elapsed = time.monotonic() - started
        assert rc != 0, f"{caller} {url} was answered: {body!r}"
        assert rc != 28, f"{caller} {url} timed out instead of being refused"
        assert elapsed < PROMPT_S + 1, f"{caller} {url} took {elapsed:.1f}s"
        expected[node] += 1
        # Meanwhile, the mesh keeps serving other pods.
        assert curl(sandbox, client, ordinary) == (0, "ok\n"), f"ordinary request after {url}"

    def all_counted() -> bool:
        now = {n: refused(sandbox, n) for n in ("n1", "n2")}
        return all(
            sum(now[node].values()) - sum(counted[node].values()) >= want
            for node, want in expected.items()
        )

    try:
        eventually(all_counted, f"the refusals counted: {expected}", timeout=10)
    except AssertionError as exc:
        now = {n: refused(sandbox, n) for n in ("n1", "n2")}
        logs = {n: sandbox.node(n).agent_log.read_text()[-3000:] for n in ("n1", "n2")}
        raise AssertionError(f"{exc}; before {counted}, now {now}; logs {logs}") from None
    for node in ("n1", "n2"):
        fds = open_fds(sandbox, node)
        assert fds <= before[node] + FD_SLACK, f"{node}'s agent: {before[node]} → {fds} fds"
    assert curl(sandbox, client, ordinary) == (0, "ok\n")
