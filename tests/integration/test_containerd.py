"""Pods made by a real runtime: containerd in n1's network namespace runs `ctr run --cni`, whose
libcni (go-cni) calls the node's chain with mesh-cni last; the pod is meshed like the sandbox's
own, its DEL removes everything, and a runtime killed in the middle of the ADD leaves nothing
once the next DEL ran. Fails (never skips) when containerd cannot run. Plain-process agents
only: ctr's netns path `/proc/<pid>/ns/net` means nothing in an agent container's own PID
namespace (docs/kubernetes.md)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from mesh_helpers import admin, eventually, sandbox_fixture

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.sandbox.containerd import Containerd, CtrPod
from nodeagent.sandbox.containerd_config import POD_NAMESPACE
from nodeagent.store import keys, open_store

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("ctrd")
SERVER = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]
IPAM_RESERVED = {"lock", "last_reserved_ip.0"}


@pytest.fixture(scope="module")
def runtime(sandbox: Sandbox) -> Iterator[Containerd]:
    ctrd = sandbox.containerd("n1")
    ctrd.start()
    try:
        yield ctrd
    finally:
        ctrd.stop()


@pytest.fixture(scope="module")
def server(sandbox: Sandbox) -> Pod:
    return sandbox.pod_add("n2", "default", "server", SERVER, labels={"app": "server"})


def enrolled(sb: Sandbox, node: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in admin(sb, node, "/pods")}


def workload_registered(sb: Sandbox, node: str, uid: str) -> bool:
    """Whether the agent's Workload for the pod (keyed by its uid) is in the store."""

    async def read() -> bool:
        store = await open_store(sb.store_url)
        try:
            kvs, _ = await store.range(keys.workload(node, uid))
            return bool(kvs)
        finally:
            await store.aclose()

    return trio.run(read)


def ipam_holders(sb: Sandbox, node: str) -> list[str]:
    """host-local's allocations on the node: each file holds the container id that owns it."""
    ipam = sb.node(node).paths.ipam_dir
    return [
        p.read_text().split()[0]
        for p in ipam.rglob("*")
        if p.is_file() and p.name not in IPAM_RESERVED
    ]


def node_links(sb: Sandbox, node: str) -> str:
    return str(sb.exec(f"node/{node}", ["ip", "-o", "link"], check=True).stdout)


def mesh_cni_calls(runtime: Containerd, container_id: str) -> list[dict[str, Any]]:
    lines = runtime.paths.mesh_cni_log.read_text().splitlines()
    return [d for d in map(json.loads, lines) if d.get("containerId") == container_id]


def http_get(runtime: Containerd, pod: CtrPod, ip: str, port: int, exec_id: str) -> str:
    """One HTTP/1.0 GET from inside the container with busybox nc ("" when it failed). Not
    busybox wget: the static build crashes in glibc's resolver code without NSS libraries."""
    request = "printf 'GET / HTTP/1.0\\r\\n\\r\\n'"
    script = f"{request} | nc -w 3 {ip} {port}"
    done = runtime.ctr(
        "task",
        "exec",
        f"--exec-id={exec_id}",
        pod.name,
        "sh",
        "-c",
        script,
        check=False,
        timeout=20,
    )
    return done.stdout if done.returncode == 0 else ""


def test_pod_made_by_containerd_is_meshed_and_deleted_cleanly(
    sandbox: Sandbox, runtime: Containerd, server: Pod
) -> None:
    pod = runtime.run_pod("client", ["sleep", "3600"])
    cid = pod.container_id
    assert cid == f"{runtime.namespace}-client"
    row = enrolled(sandbox, "n1")[cid]
    # ctr sends no CNI_ARGS: mesh-cni's unnamedPods named the pod after its container id.
    assert (row["namespace"], row["uid"], row["container_id"]) == (POD_NAMESPACE, cid, cid)
    assert row["service_account"] == "default"
    assert row["netns"] == f"/proc/{row['netns'].split('/')[2]}/ns/net"
    assert row["addresses"] == [pod.ip]
    assert workload_registered(sandbox, "n1", cid)
    [add] = [c for c in mesh_cni_calls(runtime, cid) if c["event"] == "cni.complete"]
    assert add["cmd"] == "ADD"

    # The sandbox's own pod passes the whole chain's CHECK (mesh-cni's asks n2's agent).
    sandbox.pod_check("server")
    before = enrolled(sandbox, "n2")["server"]["connections"]["inbound"]["mtls"]
    deadline = time.monotonic() + 20
    attempt = 0
    while not (answer := http_get(runtime, pod, server.ip, 8080, f"get{attempt}")):
        attempt += 1
        assert time.monotonic() < deadline, f"no answer from {server.ip}:8080 to the containerd pod"
        time.sleep(0.3)
    assert answer.startswith("HTTP/1.0 200 OK")
    assert "Directory listing" in answer
    # Captured in the pod by n1's agent, tunneled over mTLS to n2's.
    eventually(
        lambda: enrolled(sandbox, "n1")[cid]["connections"]["outbound"]["mtls"] > 0,
        "n1's agent counted the containerd pod's connection as tunneled",
    )
    assert enrolled(sandbox, "n2")["server"]["connections"]["inbound"]["mtls"] > before
    assert cid in ipam_holders(sandbox, "n1")

    rc = runtime.delete_pod(pod)
    assert rc == 137  # ctr run reports the task's SIGKILL
    # ctr's DEL (CNI_NETNS empty, the cached result as prevResult) removed everything.
    dels = [c for c in mesh_cni_calls(runtime, cid) if c["cmd"] == "DEL"]
    assert [c["event"] for c in dels] == ["cni.complete"]
    assert cid not in enrolled(sandbox, "n1")
    assert not workload_registered(sandbox, "n1", cid)
    assert cid not in ipam_holders(sandbox, "n1")
    assert not runtime.paths.cached_result(cid).exists()
    assert runtime.containers() == []
    eventually(lambda: "veth" not in node_links(sandbox, "n1"), "the pod's veth is gone", 10)


def _descendant_running(root: int, word: str) -> int | None:
    """The pid of a process under `root` whose command line holds `word`."""
    todo = [root]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            for kid in kids:
                try:
                    if word in Path(f"/proc/{kid}/cmdline").read_text():
                        return kid
                except OSError:
                    continue
            todo.extend(kids)
    return None


def _stall_add_at_mesh_cni(sandbox: Sandbox, runtime: Containerd, name: str) -> tuple[Any, int]:
    """Start `ctr run` with n1's agent stopped (SIGSTOP), so the ADD waits at mesh-cni, the
    last plugin (bridge and host-local are done); returns (ctr's Popen, mesh-cni's pid)."""
    ctr = runtime.spawn_pod(name, ["sleep", "3600"])
    deadline = time.monotonic() + 20
    while (plugin := _descendant_running(ctr.pid, "mesh-cni")) is None:
        assert ctr.poll() is None, "ctr run ended before its ADD reached mesh-cni"
        assert time.monotonic() < deadline, "mesh-cni never ran"
        time.sleep(0.05)
    return ctr, plugin


def _assert_nothing_left(sandbox: Sandbox, runtime: Containerd, name: str) -> None:
    cid = runtime.container_id(name)
    assert cid not in enrolled(sandbox, "n1")
    assert not workload_registered(sandbox, "n1", cid)
    assert cid not in ipam_holders(sandbox, "n1")
    assert not runtime.paths.cached_result(cid).exists()
    assert runtime.containers() == []
    eventually(lambda: "veth" not in node_links(sandbox, "n1"), "the pod's veth is gone", 10)
    ours = str(runtime.paths.socket).encode()
    shims = [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and {name.encode(), ours} <= set(_cmdline(p).split(b"\0"))
    ]
    assert shims == [], f"the shim of {name} is still running"


def test_runtime_killed_mid_add_leaves_nothing_after_the_next_del(
    sandbox: Sandbox, runtime: Containerd
) -> None:
    agent = sandbox.node("n1").agent_pid
    assert agent is not None
    cid = runtime.container_id("crash")
    os.kill(agent, signal.SIGSTOP)
    try:
        ctr, plugin = _stall_add_at_mesh_cni(sandbox, runtime, "crash")
        # The whole runtime dies mid-ADD: containerd, and ctr, which runs libcni (so no ADD
        # result is cached, and no deferred DEL happens).
        runtime.kill()
        ctr.kill()
        ctr.wait()
    finally:
        os.kill(agent, signal.SIGCONT)
    assert cid in ipam_holders(sandbox, "n1")
    assert not runtime.paths.cached_result(cid).exists()
    # The orphaned plugin still gets the agent's answer: the agent enrolled a pod whose runtime
    # is gone, its veth is on the node, its address allocated, and no runtime knows of it.
    eventually(lambda: not Path(f"/proc/{plugin}").exists(), "the orphaned mesh-cni ended", 40)
    assert cid in enrolled(sandbox, "n1")
    assert workload_registered(sandbox, "n1", cid)
    assert "veth" in node_links(sandbox, "n1")

    # containerd again (its shim kept the created task), the container removed, then the DEL a
    # runtime repeats for a sandbox whose own DEL never ran.
    runtime.start()
    assert runtime.containers() == ["crash"]
    runtime.ctr("task", "delete", "--force", "crash")
    runtime.ctr("container", "delete", "crash")
    runtime.delete_network("crash")
    _assert_nothing_left(sandbox, runtime, "crash")


def test_containerd_killed_mid_add_leaves_nothing_after_ctrs_own_del(
    sandbox: Sandbox, runtime: Containerd
) -> None:
    """Only containerd dies: ctr finishes the ADD, fails to start the task, and its deferred
    DEL undoes the chain; what is left is containerd's, removed once it is back."""
    agent = sandbox.node("n1").agent_pid
    assert agent is not None
    os.kill(agent, signal.SIGSTOP)
    try:
        ctr, _ = _stall_add_at_mesh_cni(sandbox, runtime, "crash2")
        runtime.kill()
    finally:
        os.kill(agent, signal.SIGCONT)
    rc = ctr.wait(timeout=60)
    assert rc != 0
    calls = [c["cmd"] for c in mesh_cni_calls(runtime, runtime.container_id("crash2"))]
    assert calls[-1] == "DEL", calls
    runtime.start()
    for name in runtime.containers():
        runtime.ctr("task", "delete", "--force", name, check=False)
        runtime.ctr("container", "delete", name)
    _assert_nothing_left(sandbox, runtime, "crash2")


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
