"""Kubelet-style probes under STRICT mTLS on a 2-node sandbox (node-side probe SNAT).

A server pod on n2 under a STRICT PeerAuthentication: `curl` from n2's node netns (as a kubelet
probes) gets in and the app sees 169.254.7.127; a pod that opted out of the mesh is refused; a
meshed client still gets in over mTLS with its own IP; n1's node (which does not host the pod,
so has no SNAT rule for it) is refused too. The rules follow pods coming and going, survive an
agent restart (probes keep working while the agent is down), and `nodeagent uninstall` removes
them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mesh_helpers import apply_file, client_pods, curl, eventually, sandbox_fixture

from nodeagent.contract import PROBE_SOURCE
from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("pr")

# HTTP on 8080 answering with the peer address the app saw.
APP = r"""
import socketserver
class Http(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = f"peer={self.client_address[0]}\n".encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Http).serve_forever()
"""
STRICT = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "default", "namespace": "shop"},
    "spec": {"mtls": {"mode": "STRICT"}},
}


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pod]:
    d = tmp_path_factory.mktemp("probes")
    (d / "app.py").write_text(APP)
    (d / "strict.json").write_text(json.dumps(STRICT))
    server = sandbox.pod_add(
        "n2", "shop", "web", ["python3", str(d / "app.py")],
        service_account="web", labels={"app": "web"},
    )  # fmt: skip
    client, outsider = client_pods(sandbox)
    apply_file(sandbox, d / "strict.json")
    return {"server": server, "client": client, "outsider": outsider}


def nat_rules(sb: Sandbox, node: str) -> list[str]:
    out = sb.exec(f"node/{node}", ["iptables-legacy-save", "-t", "nat"], timeout=10)
    return [ln for ln in str(out.stdout).splitlines() if "MESH_POSTRT" in ln]


def test_node_probe_passes_strict_while_plaintext_is_refused(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    server, client, outsider = pods["server"], pods["client"], pods["outsider"]
    url = f"http://{server.ip}:8080/"
    rule = (
        f"-A MESH_POSTRT -d {server.ip}/32 -p tcp -m owner --socket-exists -j SNAT "
        f"--to-source {PROBE_SOURCE}"
    )
    eventually(lambda: rule in nat_rules(sandbox, "n2"), "n2 SNATs probes to the pod")
    eventually(lambda: curl(sandbox, outsider, url)[0] != 0, "STRICT refuses plaintext")
    # The kubelet's probe from the pod's node: SNATed, let through, no mTLS needed.
    rc, out = curl(sandbox, "node/n2", url)
    assert rc == 0, f"probe from node n2 failed (rc {rc})"
    assert out.strip() == f"peer={PROBE_SOURCE}"
    # A meshed client still goes through mTLS and keeps its own address.
    rc, out = curl(sandbox, client, url)
    assert (rc, out.strip()) == (0, f"peer={client.ip}")
    # The other node has no rule for this pod: its plaintext is captured and refused.
    assert curl(sandbox, "node/n1", url)[0] != 0
    assert rule not in nat_rules(sandbox, "n1")


def test_rules_survive_an_agent_restart(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    url = f"http://{pods['server'].ip}:8080/"
    before = nat_rules(sandbox, "n2")
    assert before, "no probe SNAT rules on n2"
    sandbox.stop_agent("n2")
    try:
        assert nat_rules(sandbox, "n2") == before  # not removed on exit
        rc, out = curl(sandbox, "node/n2", url)  # probes work while the agent is down
        assert (rc, out.strip()) == (0, f"peer={PROBE_SOURCE}")
    finally:
        sandbox.start_agent("n2")
    assert nat_rules(sandbox, "n2") == before  # re-applied, not duplicated
    assert before.count("-A POSTROUTING -j MESH_POSTRT") == 1


def test_rules_follow_pods_coming_and_going(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    extra = sandbox.pod_add("n2", "shop", "extra", ["sleep", "3600"], service_account="web")
    rule = f"-A MESH_POSTRT -d {extra.ip}/32 -p tcp"
    try:
        eventually(lambda: any(r.startswith(rule) for r in nat_rules(sandbox, "n2")), "added")
    finally:
        sandbox.pod_del("extra", "shop")
    eventually(lambda: not any(r.startswith(rule) for r in nat_rules(sandbox, "n2")), "removed")
    assert any(pods["server"].ip in r for r in nat_rules(sandbox, "n2"))  # the others stay


def test_uninstall_removes_the_rules(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    """Last (it leaves n2 without agent or rules): `nodeagent uninstall` in the node netns."""
    assert nat_rules(sandbox, "n2")
    sandbox.stop_agent("n2")
    run_dir = sandbox.node("n2").paths.run_dir
    done = sandbox.exec(
        "node/n2",
        [str(Path(sys.prefix) / "bin" / "nodeagent"), "uninstall", "--node", "n2",
         "--store", sandbox.store_url, "--run-dir", str(run_dir)],
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, f"uninstall: {done.stdout!r} {done.stderr!r}"
    assert nat_rules(sandbox, "n2") == []
    # Nothing captures or SNATs any more: the app sees the node's own bridge address.
    rc, out = curl(sandbox, "node/n2", f"http://{pods['server'].ip}:8080/")
    assert rc == 0
    assert out.strip() != f"peer={PROBE_SOURCE}"
