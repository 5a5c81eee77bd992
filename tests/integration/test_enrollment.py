"""Pod enrollment end to end on a 2-node sandbox: real CNI chain, real iptables, real agents.

One sandbox serves the module; tests that stop or kill an agent bring it back before they end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from mesh_helpers import admin, apply, eventually, meshctl, sandbox_fixture
from snapshot_docs import service

from nodeagent.contract import INBOUND_PLAINTEXT_PORT
from nodeagent.sandbox import Sandbox, SandboxError
from nodeagent.store import codec, keys, open_store

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("it")
SERVER = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]


def pod_stats(sb: Sandbox, node: str, name: str) -> dict[str, Any]:
    pods = {p["name"]: p for p in admin(sb, node, "/pods")}
    assert name in pods, f"{name} not enrolled on {node}: {sorted(pods)}"
    return pods[name]


def wait_http(sb: Sandbox, client: str, url: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        r = sb.exec(client, ["curl", "-s", "--max-time", "2", url])
        if r.returncode == 0:
            return str(r.stdout)
        if time.monotonic() > deadline:
            raise AssertionError(f"curl {url} from {client}: rc={r.returncode} {r.stderr}")
        time.sleep(0.2)


def iptables_save(sb: Sandbox, pod: str) -> str:
    return str(sb.exec(pod, ["iptables-legacy-save"], check=True).stdout)


def workloads(sb: Sandbox) -> dict[str, dict[str, Any]]:
    async def read() -> dict[str, dict[str, Any]]:
        store = await open_store(sb.store_url)
        try:
            kvs, _ = await store.range(keys.WORKLOADS)
            return {kv.key: codec.decode(kv) for kv in kvs}
        finally:
            await store.aclose()

    return trio.run(read)


def test_cross_node_connection_is_captured_by_both_agents(sandbox: Sandbox) -> None:
    server = sandbox.pod_add("n2", "default", "server", SERVER, labels={"app": "server"})
    client = sandbox.pod_add("n1", "default", "client", ["sleep", "3600"], service_account="cli")
    before_out = pod_stats(sandbox, "n1", "client")["connections"]["outbound"]["opened"]
    before_in = pod_stats(sandbox, "n2", "server")["connections"]["inbound"]["opened"]

    body = wait_http(sandbox, client.key, f"http://{server.ip}:8080/")
    assert "Directory listing" in body

    # Bytes are counted when the relay of a connection ends, a moment after curl has its body.
    eventually(
        lambda: pod_stats(sandbox, "n1", "client")["connections"]["outbound"]["bytes_received"] > 0,
        "n1's outbound connection counted the bytes it relayed",
    )
    out = pod_stats(sandbox, "n1", "client")["connections"]["outbound"]
    inb = pod_stats(sandbox, "n2", "server")["connections"]["inbound"]
    assert out["opened"] > before_out, out
    assert inb["opened"] > before_in, inb
    # The admin socket shows the pod's HBONE pool: the connection rode a pooled stream.
    pool = pod_stats(sandbox, "n1", "client")["tunnel_pool"]
    assert pool["streams_opened"] >= 1, pool
    assert pool["connections_opened"] >= 1, pool
    # The application saw the client pod's own address (IP_TRANSPARENT delivery).
    assert f"{client.ip} - -" in server.log.read_text()
    # Both pods carry the mesh's own chains and are registered with their identity.
    assert "MESH_" in iptables_save(sandbox, client.key)
    docs = workloads(sandbox)
    assert docs[keys.workload("n1", client.uid)]["spec"]["serviceAccount"] == "cli"
    assert docs[keys.workload("n2", server.uid)]["spec"]["addresses"] == [server.ip]


def test_add_fails_closed_while_agent_is_down_and_succeeds_on_retry(sandbox: Sandbox) -> None:
    sandbox.stop_agent("n1")
    try:
        with pytest.raises(SandboxError, match="not reachable"):
            sandbox.pod_add("n1", "default", "early", ["sleep", "3600"])
        assert all(p.name != "early" for p in sandbox.pods())
        # This sandbox's netns only: other sandboxes may run this test at the same time.
        assert not any(n.startswith(sandbox.name) and "early" in n for n in _netns_names())
    finally:
        sandbox.start_agent("n1")
    sandbox.pod_add("n1", "default", "early", ["sleep", "3600"])
    assert pod_stats(sandbox, "n1", "early")["state"] == "enrolled"


def test_killed_agent_readopts_pods_and_captures_again(sandbox: Sandbox) -> None:
    server = sandbox.pod("default/server")
    client = sandbox.pod("default/client")
    pid = sandbox.node("n2").agent_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)
    rules_while_down = iptables_save(sandbox, server.key)
    assert (
        "MESH_" in rules_while_down
    )  # fail closed: the pod stays captured while the agent is gone
    sandbox.stop_agent("n2")  # reap and clear the recorded pid
    sandbox.start_agent("n2")
    stats = pod_stats(sandbox, "n2", "server")
    assert stats["state"] == "enrolled"
    assert stats["connections"]["inbound"]["opened"] == 0  # a new process: counters restart
    wait_http(sandbox, client.key, f"http://{server.ip}:8080/")
    assert pod_stats(sandbox, "n2", "server")["connections"]["inbound"]["opened"] >= 1
    # Exactly one copy of the rules after re-adoption repaired them.
    assert iptables_save(sandbox, server.key).count(f"--to-ports {INBOUND_PLAINTEXT_PORT}") == 1


def test_restart_forgets_pods_that_went_away(sandbox: Sandbox) -> None:
    pod = sandbox.pod_add("n1", "default", "ghost", ["sleep", "3600"])
    sandbox.stop_agent("n1")
    try:
        subprocess.run(
            ["ip", "netns", "del", pod.netns], check=True
        )  # gone behind the agent's back
    finally:
        sandbox.start_agent("n1")
    names = [p["name"] for p in admin(sandbox, "n1", "/pods")]
    assert "ghost" not in names
    assert keys.workload("n1", pod.uid) not in workloads(sandbox)
    sandbox.pod_del("ghost")


def test_del_succeeds_with_agent_down(sandbox: Sandbox) -> None:
    pod = sandbox.pod_add("n1", "default", "short", ["sleep", "3600"])
    sandbox.stop_agent("n1")
    try:
        assert sandbox.pod_del("short")
        assert pod.netns not in _netns_names()
    finally:
        sandbox.start_agent("n1")
    # The restarted agent noticed the pod is gone and unregistered it.
    assert keys.workload("n1", pod.uid) not in workloads(sandbox)


def test_check_detects_missing_rules(sandbox: Sandbox) -> None:
    pod = sandbox.pod("default/client")
    assert _cni_check(sandbox, pod.key).returncode == 0
    sandbox.exec(pod.key, ["iptables-legacy", "-t", "nat", "-F", "OUTPUT"], check=True)
    r = _cni_check(sandbox, pod.key)
    assert r.returncode != 0
    assert json.loads(r.stdout)["msg"], r.stdout
    # Re-adoption repairs it: restart the agent, CHECK passes again.
    sandbox.stop_agent("n1")
    sandbox.start_agent("n1")
    assert _cni_check(sandbox, pod.key).returncode == 0


def test_excluded_namespace_and_opted_out_pods_pass_through(sandbox: Sandbox) -> None:
    system = sandbox.pod_add("n1", "kube-system", "dns", ["sleep", "3600"])
    optout = sandbox.pod_add(
        "n1", "default", "legacy", ["sleep", "3600"], labels={"istio.io/dataplane-mode": "none"}
    )
    names = [p["name"] for p in admin(sandbox, "n1", "/pods")]
    assert "dns" not in names
    assert "legacy" not in names
    for pod in (system, optout):
        assert "MESH_" not in iptables_save(sandbox, pod.key)
    sandbox.pod_del("dns", "kube-system")
    sandbox.pod_del("legacy", "default")


def test_an_unanswered_passthrough_leaves_no_way_around_the_capture(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """An address n1's snapshot does not know is passed through: the agent dials it from the
    pod. Before the Service exists nothing answers its VIP, so the dial leaves an unreplied
    conntrack entry for its source port. The app's own connections from those ports, once the
    Service exists, must still be captured: they matched the agent's entry as a retransmission,
    skipped nat and left the pod unproxied for 120 s (the workers test's rare "network is
    unreachable"), until the agent's connections got a conntrack zone of their own
    (docs/redirection.md)."""
    vip, url = "10.96.55.5", "http://10.96.55.5/"
    sandbox.pod_add("n2", "default", "ct-server", SERVER, labels={"app": "ct-server"})
    client = sandbox.pod_add("n1", "default", "ct-client", ["sleep", "3600"])
    ports = "/proc/sys/net/ipv4/ip_local_port_range"
    default_range = str(sandbox.exec(client, ["cat", ports], check=True).stdout).split()
    # The agent's dials from the pod can only take 40000 or 40001 while it passes the VIP through.
    sandbox.exec(client, ["sh", "-c", f"echo 40000 40001 > {ports}"], check=True)
    for app_port in (41000, 41001):  # the app's own ports: outside that range
        r = sandbox.exec(
            client, ["curl", "-s", "--max-time", "2", "--local-port", str(app_port), url]
        )
        assert r.returncode != 0, "nothing serves the VIP yet"
    sandbox.exec(client, ["sh", "-c", f"echo {' '.join(default_range)} > {ports}"], check=True)
    svc = apply(sandbox, tmp_path, "ct-svc", [service("ct-server", cluster_ip=vip)])
    app_ports = iter(range(41010, 41100))  # fixed: an ephemeral one could be 40000 or 40001
    eventually(
        lambda: (
            sandbox.exec(
                client,
                ["curl", "-sf", "--max-time", "2", "--local-port", str(next(app_ports)), url],
            ).returncode
            == 0
        ),
        f"{url} answers through the mesh",
    )
    agent_dials = ["ss", "-Htan", "( sport = :40000 or sport = :40001 )"]
    eventually(  # their sockets free the ports; their conntrack entries stay
        lambda: not sandbox.exec(client, agent_dials, check=True).stdout.strip(),
        "the agent's unanswered dials ended",
    )
    for app_port in (40000, 40001):
        r = sandbox.exec(
            client, ["curl", "-sS", "--max-time", "5", "--local-port", str(app_port), url]
        )
        assert r.returncode == 0, f"from port {app_port}: {r.stderr.strip()}"
        assert "Directory listing" in r.stdout
    meshctl(sandbox, "delete", "-f", str(svc))
    sandbox.pod_del("ct-client", "default")
    sandbox.pod_del("ct-server", "default")


def test_uninstall_removes_every_rule(sandbox: Sandbox) -> None:
    node = sandbox.node("n1")
    enrolled = [p for p in sandbox.pods() if p.node == "n1"]
    assert enrolled
    sandbox.stop_agent("n1")
    try:
        r = subprocess.run(
            [
                str(Path(sys.prefix) / "bin" / "nodeagent"),
                "uninstall",
                "--node",
                "n1",
                "--store",
                sandbox.store_url,
                "--run-dir",
                str(node.run_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        for pod in enrolled:
            assert "MESH_" not in iptables_save(sandbox, pod.key)
            rules = sandbox.exec(pod.key, ["ip", "rule"], check=True).stdout
            assert "fwmark" not in rules
        assert not [k for k in workloads(sandbox) if k.startswith(keys.node_workloads("n1"))]
    finally:
        sandbox.start_agent("n1")
    assert admin(sandbox, "n1", "/pods") == []


def _cni_check(sb: Sandbox, key: str) -> subprocess.CompletedProcess[str]:
    """Run the chain's last plugin (mesh-cni) with CHECK, as a runtime would after ADD."""
    from nodeagent.sandbox.cni import plugin_config

    ps = sb.state().pods[key]
    assert ps.netconf is not None
    mesh = ps.netconf["plugins"][-1]
    assert mesh["type"] == "mesh-cni"
    repo = Path(__file__).resolve().parents[2]
    env = {
        "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}",  # mesh-cni needs msgpack
        "CNI_COMMAND": "CHECK",
        "CNI_CONTAINERID": ps.container_id,
        "CNI_NETNS": f"/run/netns/{ps.netns}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": ps.cni_args,
        "CNI_PATH": f"{repo / 'cni-plugin'}:/usr/lib/cni",
    }
    return subprocess.run(
        [str(repo / "cni-plugin" / "mesh-cni")],
        input=plugin_config(ps.netconf, mesh, ps.result).decode(),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _wait_dead(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still alive")
        time.sleep(0.05)


def test_teardown_leaves_nothing() -> None:
    name = f"td{os.getpid() % 100000}"
    links_before = _root_links()
    sb = Sandbox.up(name, nodes=2, store="sqlite", progress=False)
    pod = sb.pod_add("n1", "default", "p", ["sleep", "3600"])
    agent_pids = [n.agent_pid for n in sb.nodes()]
    sb.down()
    assert not [n for n in _netns_names() if n.startswith(name)]
    assert not sb.state_dir.exists()
    assert _root_links() == links_before
    for pid in [*agent_pids, pod.pid]:
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip() for line in out.stdout.splitlines()}
