"""The agent across store outages, restarts and uninstall, on a 2-node sandbox with a real etcd
and a short lease TTL (issue 21, items 6, 7 and 9).

- etcd paused (SIGSTOP) longer than the lease TTL under a steady request loop from a pod on n1 to
  a service on n2: every node's lease expires when etcd resumes, and not one request fails;
- n2's lease revoked in the store under a running agent (what etcd does to every lease after a
  stall, without the timing luck of an in-flight renewal): the agent learns it at its next
  renewal (up to ttl/3 later) and registers again; n1 keeps n2's workloads meanwhile;
- n1's agent restarted while etcd is stopped: it serves its pods from its disk snapshot and
  certificates within seconds, and registers once etcd is back;
- `nodeagent uninstall` while the agent runs: it stops the agent first, and with the agent gone
  nothing re-creates the node's chain, the pod's rules or the registrations.

The tests share one sandbox and run in this order (the last one uninstalls n1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mesh_helpers import admin

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.etcd]

BIN = Path(sys.prefix) / "bin"
LEASE_TTL = 3.0
VIP = "10.96.77.7"
SERVER = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]

# A request loop in the client pod: one new connection per request (each one picks an endpoint
# from the agent's current snapshot), bounded in count and time, until the stop file appears.
LOOP = textwrap.dedent(
    """
    import http.client, json, os, sys, time
    url_host, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ok, failed, errors = 0, 0, []
    deadline = time.monotonic() + 120
    while not os.path.exists(stop) and time.monotonic() < deadline and ok + failed < 100000:
        try:
            c = http.client.HTTPConnection(url_host, 80, timeout=5)
            c.request("GET", "/", headers={"Connection": "close"})
            status = c.getresponse().status
            c.close()
        except Exception as exc:
            status = repr(exc)
        if status == 200:
            ok += 1
        else:
            failed += 1
            if len(errors) < 20:
                errors.append([round(time.time(), 3), str(status)])
        time.sleep(0.02)
    with open(out, "w") as f:
        json.dump({"ok": ok, "failed": failed, "errors": errors}, f)
    """
)


def eventually(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll `check` until it returns something truthy (bounded); its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def meshctl(sb: Sandbox, *args: str) -> str:
    # etcd is reachable from the sandbox's namespaces only
    r = sb.exec("node/n1", [str(BIN / "meshctl"), "--store", sb.store_url, *args])
    assert r.returncode == 0, f"meshctl {args}: {r.stdout} {r.stderr}"
    return str(r.stdout)


def workloads_of(sb: Sandbox, node: str) -> set[str]:
    out = json.loads(meshctl(sb, "get", "workloads", "-A", "-o", "json"))
    items = out["items"] if isinstance(out, dict) else out
    return {d["metadata"]["name"] for d in items if d["spec"]["node"] == node}


def agent_dump(sb: Sandbox, node: str) -> dict[str, Any]:
    return dict(admin(sb, node, "/config_dump"))


def curl(sb: Sandbox, pod: Pod, url: str) -> bool:
    r = sb.exec(pod.key, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2", url])
    return r.stdout == "200"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox.up(
        f"lc{os.getpid() % 100000}",
        nodes=2,
        store="etcd",
        agent_args=["--lease-ttl", str(LEASE_TTL)],
        progress=False,
    )
    try:
        yield sb
    finally:
        sb.down()


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pod, Pod]:
    srv = sandbox.pod_add("n2", "shop", "web", SERVER, labels={"app": "web"})
    cli = sandbox.pod_add("n1", "shop", "sleep", ["sleep", "3600"], service_account="sleep")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "clusterIP": VIP,
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }
    path = tmp_path_factory.mktemp("lifecycle") / "web.json"
    path.write_text(json.dumps(service))
    meshctl(sandbox, "apply", "-f", str(path))
    eventually("the service answers", lambda: curl(sandbox, cli, f"http://{VIP}/"), 20)
    return cli, srv


class RequestLoop:
    """LOOP running in a pod; `finish()` stops it and returns its counts."""

    def __init__(self, sb: Sandbox, pod: Pod, tmp: Path) -> None:
        self.stop, self.out = tmp / "stop", tmp / "result.json"
        self.proc = sb.popen(
            pod.key,
            [sys.executable, "-c", LOOP, VIP, str(self.stop), str(self.out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self) -> dict[str, Any]:
        self.stop.touch()
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return dict(json.loads(self.out.read_text()))


def wait_new_lease(sb: Sandbox, node: str, old: int) -> None:
    eventually(
        f"{node}'s agent holds a new lease and registered under it",
        lambda: (d := agent_dump(sb, node))["lease"] not in (0, old) and d["registered"],
        30,
    )


def renew_failures(sb: Sandbox, node: str, wait_for_more_than: int | None = None) -> int:
    """How many renewals of `node`'s lease failed so far (its agent's log); with
    `wait_for_more_than`, wait (bounded) until that count is passed."""

    def count() -> int:
        return sb.node(node).agent_log.read_text(errors="replace").count('"lease.renew_failed"')

    if wait_for_more_than is None:
        return count()
    return int(
        eventually("a renewal gives up", lambda: (n := count()) > wait_for_more_than and n, 30)
    )


def test_store_stall_longer_than_the_lease_ttl_fails_no_request(
    sandbox: Sandbox, pods: tuple[Pod, Pod], tmp_path: Path
) -> None:
    cli, _ = pods
    leases = {n: agent_dump(sandbox, n)["lease"] for n in ("n1", "n2")}
    loop = RequestLoop(sandbox, cli, tmp_path)
    try:
        time.sleep(1.0)  # requests flow before the stall
        sandbox.pause_store()
        try:
            time.sleep(2 * LEASE_TTL)  # every lease is past its TTL when etcd resumes
            # Resume just after a renewal of n2's gave up: its agent is then between two
            # attempts (not blocked in one that etcd answers the moment it resumes), so etcd
            # drops n2's workloads a while before the agent can learn it and put them back.
            renew_failures(sandbox, "n2", wait_for_more_than=renew_failures(sandbox, "n2"))
        finally:
            sandbox.resume_store()
        # The leases really expired (etcd revoked them, the agents took new ones) ...
        for node in ("n1", "n2"):
            wait_new_lease(sandbox, node, leases[node])
        assert workloads_of(sandbox, "n2") == {"web"}
        assert workloads_of(sandbox, "n1") == {"sleep"}
        time.sleep(2.0)  # and requests keep flowing after the recovery
    finally:
        result = loop.finish()
    assert result["ok"] > 50, result
    assert result["failed"] == 0, result


def test_lease_revoked_under_a_running_agent_keeps_its_endpoints(
    sandbox: Sandbox, pods: tuple[Pod, Pod], tmp_path: Path
) -> None:
    cli, _ = pods
    lease = agent_dump(sandbox, "n2")["lease"]
    loop = RequestLoop(sandbox, cli, tmp_path)
    try:
        time.sleep(1.0)
        r = sandbox.exec(
            "node/n2",
            ["env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={sandbox.state().etcd_url}",
             "lease", "revoke", f"{lease:x}"],
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        wait_new_lease(sandbox, "n2", lease)
        assert workloads_of(sandbox, "n2") == {"web"}
        time.sleep(1.0)
    finally:
        result = loop.finish()
    assert result["ok"] > 50, result
    assert result["failed"] == 0, result


def test_agent_restarted_while_the_store_is_down_serves_from_disk(
    sandbox: Sandbox, pods: tuple[Pod, Pod]
) -> None:
    cli, _ = pods
    sandbox.stop_store()
    try:
        sandbox.stop_agent("n1")
        started = time.monotonic()
        sandbox.start_agent("n1", timeout=30)
        eventually(
            "sleep → web through the restarted agent",
            lambda: curl(sandbox, cli, f"http://{VIP}/"),
            10,
        )
        served_after = time.monotonic() - started
        dump = agent_dump(sandbox, "n1")
        assert dump["snapshot"]["workloads"] == 2  # from the disk cache
        assert not dump["registered"]
    finally:
        sandbox.start_store()
    assert served_after < 10.0, f"pods served again {served_after:.1f}s after the restart"
    eventually(
        "n1 registered once etcd is back", lambda: agent_dump(sandbox, "n1")["registered"], 30
    )
    eventually(
        "n1's workload is in the store", lambda: workloads_of(sandbox, "n1") == {"sleep"}, 10
    )
    assert curl(sandbox, cli, f"http://{VIP}/")


def test_uninstall_stops_the_running_agent_and_nothing_comes_back(
    sandbox: Sandbox, pods: tuple[Pod, Pod]
) -> None:
    cli, _ = pods
    node = sandbox.node("n1")
    agent = sandbox.state().nodes["n1"].agent
    assert agent is not None
    assert agent.alive()
    assert "MESH_POSTRT" in sandbox.exec("node/n1", ["iptables-legacy-save", "-t", "nat"]).stdout
    r = sandbox.exec(
        "node/n1",
        [str(BIN / "nodeagent"), "uninstall", "--node", "n1", "--store", sandbox.store_url,
         "--run-dir", str(node.run_dir)],
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # uninstall returned after the agent's exit: nothing is left that could re-create anything,
    # so the checks below need no waiting.
    assert not agent.alive(), "the agent still runs after uninstall"
    assert (
        "MESH_POSTRT" not in sandbox.exec("node/n1", ["iptables-legacy-save", "-t", "nat"]).stdout
    )
    assert "MESH_" not in sandbox.exec(cli.key, ["iptables-legacy-save"]).stdout
    assert workloads_of(sandbox, "n1") == set()
    assert not (node.run_dir / "agent.pid").exists()
    assert not (node.run_dir / "enrolled.msgpack").exists()
