"""A gRPC channel across graceful restarts of either agent (docs/dataplane.md, "Restarts"): a
real grpcio client on n1 calls a grpcio server on n2 without pause on one channel (one HTTP/2
connection) while n1's agent (its HTTP/2 proxy serves the channel) or n2's (its HBONE server
and InboundH2 serve n1's upstream) restarts. The draining agent's graceful GOAWAY moves the
channel, or n1's upstream, to the agent taking over, and lets the calls under way finish: no
call fails, and none waits for the drain deadline (5 s), when the old agent would cut it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from grpc_apps import PY, unary, write_apps
from mesh_helpers import apply, eventually, json_lines, sandbox_fixture
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("grs")
VIP = "10.96.84.10"
DRAIN = 5.0  # the agents' default --drain-timeout
CALLS_FOR = 10.0  # seconds of calls: before the restart, and past the old agent's drain deadline


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grpc-restart")


@pytest.fixture(scope="module")
def client(sandbox: Sandbox, files: Path) -> Pod:
    apps = write_apps(files)
    sandbox.pod_add(
        "n2",
        "default",
        "echo",
        [PY, str(apps["grpc_server"]), "echo", "10"],
        labels={"app": "echo"},
    )
    pod = sandbox.pod_add("n1", "default", "client", ["sleep", "3600"])
    apply(sandbox, files, "echo", [service("echo", cluster_ip=VIP, port_name="grpc")])
    eventually(
        lambda: unary(sandbox, pod, files, VIP, 1)["codes"] == {"OK": 1},
        "a gRPC call to echo",
        timeout=40,
    )
    return pod


@pytest.mark.parametrize("node", ["n1", "n2"], ids=["source-agent", "destination-agent"])
def test_a_channel_across_a_graceful_restart_fails_no_call(
    sandbox: Sandbox, client: Pod, files: Path, node: str
) -> None:
    caller = sandbox.popen(
        client,
        [PY, str(files / "grpc_client.py"), f"{VIP}:80", "for", str(CALLS_FOR)],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    try:
        time.sleep(1.5)  # calls run against the old agent first
        sandbox.restart_agent(node)
        out, err = caller.communicate(timeout=60)
    finally:
        caller.kill()
        caller.wait()
    lines = [x for x in out.splitlines() if x.startswith("{")]
    assert lines, f"grpc client: {out} {err}"
    got = json.loads(lines[-1])
    print(f"restart of {node}'s agent under one gRPC channel: {got}")
    assert got["codes"] == {"OK": got["calls"]}, (got, failed_requests(sandbox))
    assert got["calls"] >= 100, got  # the calls really ran (10 ms each)
    # Moved on by the GOAWAY, not cut at the drain deadline (a call would have failed then).
    assert got["slowest_s"] < DRAIN, got


def failed_requests(sb: Sandbox) -> list[dict[str, object]]:
    """The agents' access log records of requests that did not end well (why a call failed)."""
    return [
        {"node": node, **doc}
        for node in ("n1", "n2")
        for doc in json_lines(sb.node(node).agent_log, "access.request")
        if doc["response_code"] != 200 or doc["response_flags"] != "-"
    ]
