"""The sandbox for real: namespaces, the real CNI plugins, pod-to-pod across nodes, teardown."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.sandbox import CniError, Sandbox, SandboxError, layout
from nodeagent.sandbox.system import ProcessRef, netns_list

pytestmark = [pytest.mark.root, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
IPAM_RESERVED = {"lock", "last_reserved_ip.0"}


def _name() -> str:
    return f"t{secrets.token_hex(3)}"


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def _own_netns(name: str) -> list[str]:
    return [n for n in netns_list() if n == name or n.startswith(f"{name}-")]


def _ipam_allocations(ipam_dir: Path) -> list[str]:
    return [p.name for p in ipam_dir.rglob("*") if p.is_file() and p.name not in IPAM_RESERVED]


@pytest.fixture
def name() -> Iterator[str]:
    n = _name()
    yield n
    # Whatever the test did, leave nothing behind (down is idempotent).
    Sandbox(n, progress=False).down()


def _wait_http(sb: Sandbox, src: str, url: str, timeout: float = 15.0) -> str:
    """curl url from src until it answers (the server in the pod needs a moment to bind)."""
    deadline = time.monotonic() + timeout
    while True:
        r = sb.exec(src, ["curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}", url])
        if r.stdout == "200" or time.monotonic() > deadline:
            return str(r.stdout)
        time.sleep(0.1)


def _write_recorder(bin_dir: Path, kind: str) -> None:
    plugin = bin_dir / kind
    plugin.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "recorder_plugin.py"} "$@"\n')
    plugin.chmod(0o755)


def _sandbox_with_plugins(name: str, tmp_path: Path, *plugins: dict[str, str]) -> Sandbox:
    """One node whose conflist ends with `plugins` (each a recorder_plugin.py under its `type`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for plugin in plugins:
        _write_recorder(bin_dir, plugin["type"])
    sb = Sandbox.up(
        name,
        nodes=1,
        agents=False,
        mesh_cni=False,
        cni_path=[layout.CNI_BIN_DIR, str(bin_dir)],
        progress=False,
    )
    conflist = sb.node("n1").conflist
    conf = json.loads(conflist.read_text())
    conf["plugins"] += list(plugins)
    conflist.write_text(json.dumps(conf))
    return sb


def test_pod_to_pod_across_nodes_then_nothing_left(name: str) -> None:
    links_before = _root_links()
    sb = Sandbox.up(name, nodes=2, agents=False, mesh_cni=False, progress=False)
    state_dir = sb.state_dir
    assert set(_own_netns(name)) == {f"{name}-ul", f"{name}-n1", f"{name}-n2", f"{name}-out"}
    server = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]
    a = sb.pod_add("n1", "default", "web-a", server, labels={"app": "a"})
    b = sb.pod_add("n2", "team", "web-b", server, service_account="sa-b")
    assert a.ip.startswith("10.201.1.")
    assert b.ip.startswith("10.201.2.")
    assert a.pid is not None
    assert b.pid is not None
    # Across nodes, both ways, through the underlay and the nodes' routes.
    assert _wait_http(sb, "team/web-b", f"http://{a.ip}:8080/") == "200"
    assert _wait_http(sb, a, f"http://{b.ip}:8080/") == "200"
    # The outside host has no route to pod CIDRs: it is outside the cluster.
    r = sb.exec("outside", ["curl", "-s", "-m", "1", f"http://{a.ip}:8080/"])
    assert r.returncode != 0
    # exec propagates the exit code; node/nI runs in the node namespace.
    assert sb.exec("web-a", ["sh", "-c", "exit 7"]).returncode == 7
    node_addrs = sb.exec("node/n1", ["ip", "-4", "-o", "addr"], check=True).stdout
    assert "10.200.0.11/24" in node_addrs
    assert "10.201.1.1/24" in node_addrs

    status = sb.status()
    assert {(p["namespace"], p["name"], p["alive"]) for p in status["pods"]} == {
        ("default", "web-a", True),
        ("team", "web-b", True),
    }
    ipam = sb.node("n1").paths.ipam_dir
    assert _ipam_allocations(ipam) == [a.ip]

    a_proc = ProcessRef.of(a.pid)
    assert sb.pod_del("web-a") is True
    assert sb.pod_del("web-a") is False  # idempotent
    assert not a_proc.alive()
    assert a.netns not in netns_list()
    assert _ipam_allocations(ipam) == []
    # The node keeps only its own links once the pod's veth is gone.
    links = sb.exec("node/n1", ["ip", "-o", "link"], check=True).stdout
    assert "veth" not in links

    b_proc = ProcessRef.of(b.pid)
    sb.down()
    assert _own_netns(name) == []
    assert not state_dir.exists()
    assert not b_proc.alive()
    assert _root_links() == links_before
    sb.down()  # idempotent


def test_failing_plugin_mid_chain_leaves_nothing(name: str, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    sb = _sandbox_with_plugins(
        name,
        tmp_path,
        {"type": "recorder", "record": str(record)},
        {"type": "failer", "record": str(record), "fail": "mesh says no: pod web is not allowed"},
    )
    node = sb.node("n1")

    with pytest.raises(CniError) as info:
        sb.pod_add("n1", "default", "web", ["sleep", "60"], labels={"app": "web"})
    assert info.value.msg == "mesh says no: pod web is not allowed"
    assert info.value.plugin == "failer"
    assert info.value.code == 999

    assert _own_netns(name) == [f"{name}-n1", f"{name}-out", f"{name}-ul"]
    assert _ipam_allocations(node.paths.ipam_dir) == []
    assert sb.status()["pods"] == []
    assert "veth" not in sb.exec("node/n1", ["ip", "-o", "link"], check=True).stdout

    # The chain ran as libcni runs it: ADD in order with prevResult, then DEL of the whole list
    # in reverse (no cached result: the ADD never completed).
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(c["command"], c["conf"]["type"]) for c in calls] == [
        ("ADD", "recorder"),
        ("ADD", "failer"),
        ("DEL", "failer"),
        ("DEL", "recorder"),
    ]
    add = calls[0]
    assert add["conf"]["name"] == layout.NETWORK_NAME
    assert add["conf"]["cniVersion"] == layout.CNI_VERSION
    assert add["conf"]["prevResult"]["ips"][0]["address"].startswith("10.201.1.")
    assert calls[1]["conf"]["prevResult"] == add["conf"]["prevResult"]
    assert "prevResult" not in calls[2]["conf"]
    env = add["env"]
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_NETNS"] == f"/run/netns/{name}-n1-default-web"
    assert env["CNI_PATH"] == f"{layout.CNI_BIN_DIR}:{tmp_path / 'bin'}"
    args = dict(kv.split("=", 1) for kv in env["CNI_ARGS"].split(";"))
    assert args["IgnoreUnknown"] == "1"
    assert args["K8S_POD_NAMESPACE"] == "default"
    assert args["K8S_POD_NAME"] == "web"
    assert args["K8S_POD_INFRA_CONTAINER_ID"] == env["CNI_CONTAINERID"]
    assert layout.decode_pod_meta(args["MESH_POD_META"]) == {
        "labels": {"app": "web"},
        "annotations": {},
        "serviceAccount": "default",
    }

    # A working chain afterwards: DEL gets the cached final result as prevResult.
    conf = json.loads(node.conflist.read_text())
    conf["plugins"].pop()
    node.conflist.write_text(json.dumps(conf))
    record.unlink()
    pod = sb.pod_add("n1", "default", "web", None)
    sb.pod_del("web")
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["command"] for c in calls] == ["ADD", "DEL"]
    assert calls[1]["conf"]["prevResult"]["ips"][0]["address"] == f"{pod.ip}/24"
    sb.down()
    assert _own_netns(name) == []


def test_del_stops_at_the_first_failing_plugin_and_is_retried(name: str, tmp_path: Path) -> None:
    """As libcni's DelNetworkList: DEL runs the list in reverse and the first failure ends it
    (the plugins before it are not called); the pod stays, and the next `pod del` retries."""
    record, refusing = tmp_path / "calls.jsonl", tmp_path / "refusing"
    sb = _sandbox_with_plugins(
        name,
        tmp_path,
        {"type": "recorder", "record": str(record)},
        {"type": "refuser", "record": str(record), "failDelWhile": str(refusing)},
    )
    node = sb.node("n1")
    sb.pod_add("n1", "default", "web", None)
    refusing.touch()
    with pytest.raises(SandboxError, match=r"CNI DEL failed: .*DEL refused"):
        sb.pod_del("web")
    calls = [
        (c["command"], c["conf"]["type"]) for c in map(json.loads, record.read_text().splitlines())
    ]
    assert calls == [("ADD", "recorder"), ("ADD", "refuser"), ("DEL", "refuser")]
    # bridge's DEL never ran: its address is still allocated, and the pod still recorded.
    assert len(_ipam_allocations(node.paths.ipam_dir)) == 1
    assert [p["name"] for p in sb.status()["pods"]] == ["web"]

    refusing.unlink()
    assert sb.pod_del("web") is True
    calls = [
        (c["command"], c["conf"]["type"]) for c in map(json.loads, record.read_text().splitlines())
    ]
    assert calls[3:] == [("DEL", "refuser"), ("DEL", "recorder")]
    assert _ipam_allocations(node.paths.ipam_dir) == []
    assert sb.status()["pods"] == []
    sb.down()


def test_check_runs_the_chain_in_order_with_the_cached_result(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As libcni's CheckNetworkList: in order (the real loopback, bridge and host-local check the
    pod too), each with the cached ADD result as prevResult. Plugins inherit the runtime's
    environment, as libcni's do, with the CNI_* variables winning."""
    monkeypatch.setenv("CNI_RUNTIME_PROBE", "inherited")
    monkeypatch.setenv("CNI_IFNAME", "not-this")
    record = tmp_path / "calls.jsonl"
    sb = _sandbox_with_plugins(
        name,
        tmp_path,
        {"type": "first", "record": str(record)},
        {"type": "second", "record": str(record)},
    )
    pod = sb.pod_add("n1", "default", "web", None)
    sb.pod_check("web")
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(c["command"], c["conf"]["type"]) for c in calls] == [
        ("ADD", "first"),
        ("ADD", "second"),
        ("CHECK", "first"),
        ("CHECK", "second"),
    ]
    for check in calls[2:]:
        assert check["conf"]["prevResult"]["ips"][0]["address"] == f"{pod.ip}/24"
        assert check["env"]["CNI_NETNS"] == f"/run/netns/{pod.netns}"
        assert check["env"]["CNI_RUNTIME_PROBE"] == "inherited"
        assert check["env"]["CNI_IFNAME"] == "eth0"
    sb.down()


def test_bad_pod_command_is_undone(name: str) -> None:
    sb = Sandbox.up(name, nodes=1, agents=False, mesh_cni=False, progress=False)
    with pytest.raises(SandboxError, match="exited with status"):
        sb.pod_add("n1", "default", "bad", ["/nonexistent/binary"])
    assert sb.status()["pods"] == []
    assert _ipam_allocations(sb.node("n1").paths.ipam_dir) == []
    assert f"{name}-n1-default-bad" not in netns_list()
    with pytest.raises(SandboxError, match="already exists"):
        Sandbox.up(name, nodes=1, agents=False, progress=False)
    with pytest.raises(SandboxError, match="no node"):
        sb.pod_add("n9", "default", "x")


def test_agents_run_in_node_namespaces_and_restart(name: str) -> None:
    agent = [sys.executable, str(HERE / "stub_agent.py"), "run"]
    sb = Sandbox.up(name, nodes=2, agent_cmd=agent, mesh_cni=False, progress=False)
    for node in sb.nodes():
        assert node.agent_pid is not None
        agent_ns = os.stat(f"/proc/{node.agent_pid}/ns/net")
        node_ns = os.stat(f"/run/netns/{node.netns}")
        assert (agent_ns.st_dev, agent_ns.st_ino) == (node_ns.st_dev, node_ns.st_ino)
        assert sb.agent_ready(node.name)
        log = node.agent_log.read_text()
        assert f"stub agent {node.name} store {sb.store_url}" in log
    assert all(n["agent_ready"] for n in sb.status()["nodes"])

    old = ProcessRef.of(sb.node("n1").agent_pid or 0)
    sb.stop_agent("n1")
    assert not old.alive()
    assert not sb.agent_ready("n1")
    sb.start_agent("n1")
    assert sb.agent_ready("n1")
    assert sb.node("n1").agent_pid != old.pid

    refs = [ProcessRef.of(n.agent_pid or 0) for n in sb.nodes()]
    sb.down()
    assert not any(r.alive() for r in refs)
    assert _own_netns(name) == []


def test_agent_that_dies_fails_up_and_is_torn_down(name: str) -> None:
    with pytest.raises(SandboxError, match="exited before it was ready") as info:
        Sandbox.up(name, nodes=1, agent_cmd=["sh", "-c", "echo boom >&2; exit 3"], progress=False)
    assert "boom" in str(info.value)
    assert _own_netns(name) == []
    assert not (layout.STATE_ROOT / name).exists()


@pytest.mark.etcd
def test_etcd_store_answers_from_a_node(name: str) -> None:
    sb = Sandbox.up(name, nodes=2, store="etcd", agents=False, progress=False)
    assert sb.store_url == "etcd://10.200.0.2:2379"
    r = sb.exec("node/n2", ["curl", "-s", "-m", "5", "http://10.200.0.2:2379/version"], check=True)
    assert json.loads(r.stdout)["etcdserver"].startswith("3.")
    etcd = sb.status()["etcd"]
    assert etcd["alive"]
    ref = ProcessRef.of(etcd["pid"])
    sb.down()
    assert not ref.alive()
    assert _own_netns(name) == []


def test_down_without_state_removes_namespaces_and_their_processes(name: str) -> None:
    # As if `up` crashed before writing its state: namespaces with our names, a process inside.
    for ns in (f"{name}-n1", f"{name}-n1-default-web", f"{name}-ul"):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", f"{name}-n1-default-web", "sleep", "300"])
    try:
        # `ip netns exec` enters the namespace, then execs sleep: wait for that, or `down` may
        # look before the process is inside and rightly miss it.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{sleeper.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "sleeper never started"
            time.sleep(0.01)
        ref = ProcessRef.of(sleeper.pid)
        with pytest.raises(SandboxError, match="exist without its state"):
            Sandbox.up(name, nodes=1, agents=False, progress=False)
        Sandbox(name, progress=False).down()
        sleeper.wait(timeout=10)
        assert not ref.alive()
        assert _own_netns(name) == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
