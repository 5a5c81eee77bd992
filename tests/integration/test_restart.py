"""Agent restarts under load on a sandbox (docs/dataplane.md, "Restarts"): a graceful restart
(SIGTERM, the new agent binds beside the draining old one) fails no request, a connection still
open at the drain deadline is closed then, and a kill -9 fails closed until the new agent is up.

Client and server pods are both on n1, so restarting n1's agent exercises the outbound capture
(15001) and the tunnel server (15008) of the same agent.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mesh_helpers import admin, restart_under_load, sandbox_fixture

import nodeagent.demo.backend
from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("rs")
BACKEND = ["python3", "-I", str(Path(nodeagent.demo.backend.__file__)), "v1", "8080"]
DRAIN = 5.0  # the agent's default --drain-timeout
# One HTTP/1.1 connection kept open: a GET every 50 ms; prints the monotonic time (the same
# clock in every process) of the first failure, and how many requests it answered before.
LONG_LIVED = """
import http.client, sys, time
c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)
ok = 0
while True:
    try:
        c.request("GET", "/")
        r = c.getresponse(); r.read()
        assert r.status == 200
        ok += 1
    except Exception as e:
        print(f"closed {time.monotonic():.3f} after {ok} {type(e).__name__}", flush=True)
        break
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox) -> tuple[Pod, Pod]:
    server = sandbox.pod_add("n1", "default", "server", BACKEND, labels={"app": "server"})
    client = sandbox.pod_add("n1", "default", "client", ["sleep", "3600"])
    url = f"http://{server.ip}:8080/"
    deadline = time.monotonic() + 20
    while sandbox.exec(client, ["curl", "-sf", "--max-time", "2", url]).returncode != 0:
        assert time.monotonic() < deadline, f"{url} never answered through the mesh"
        time.sleep(0.2)
    return server, client


@pytest.mark.parametrize("takeover", [False, True], ids=["sigterm-first", "takeover"])
def test_graceful_restart_under_load_fails_no_request(
    sandbox: Sandbox, pods: tuple[Pod, Pod], takeover: bool
) -> None:
    """sigterm-first: the old agent is stopped, then the new one starts (maxSurge 0).
    takeover: the new one starts beside it with --takeover (maxSurge 1); the old one hands
    over, drains, parks until its SIGTERM (restart_agent fails if it does not)."""
    server, client = pods
    url = f"http://{server.ip}:8080/"
    results, restart_s = restart_under_load(sandbox, client, url, "n1", takeover=takeover)
    print(f"restart took {restart_s:.1f}s (new agent ready, old drained): {results}")
    for name, (ok, failed, errors) in results.items():
        assert failed == 0, f"{name}: {failed} failed requests during the restart: {errors}"
        assert ok >= 100, f"{name}: only {ok} requests answered"  # the load really ran
    # ...across the restart: the new agent took over the client's new connections.
    served = {p["name"]: p for p in admin(sandbox, "n1", "/pods")}["client"]
    assert served["connections"]["outbound"]["opened"] > 0


def test_a_connection_open_across_a_graceful_restart_is_closed_at_the_drain_deadline(
    sandbox: Sandbox, pods: tuple[Pod, Pod]
) -> None:
    server, client = pods
    talker = sandbox.popen(
        client, ["python3", "-c", LONG_LIVED, server.ip], stdout=-1, stderr=-1, text=True
    )
    try:
        time.sleep(0.5)  # the connection is open and answering
        restart = sandbox.restart_agent("n1")
        out, err = talker.communicate(timeout=20)
    finally:
        talker.kill()
        talker.wait()
    m = re.match(r"closed ([\d.]+) after (\d+)", out)
    assert m, f"the long-lived connection did not report its end: {out!r} {err!r}"
    closed_at = float(m.group(1))
    closed_after = closed_at - restart.ready_at
    print(
        f"long-lived connection closed {closed_at - restart.sigterm_at:.2f}s after SIGTERM, "
        f"{closed_after:.2f}s after the new agent was ready ({m.group(2)} requests)"
    )
    # Served by the old agent for the drain time after the handover (not cut at it), closed then.
    assert DRAIN - 0.5 <= closed_after <= DRAIN + 1.5, closed_after
    # And the client's next connection is served by the new agent.
    assert (
        sandbox.exec(
            client, ["curl", "-sf", "--max-time", "3", f"http://{server.ip}:8080/"]
        ).returncode
        == 0
    )


def test_kill_9_fails_closed_until_the_new_agent_serves(
    sandbox: Sandbox, pods: tuple[Pod, Pod]
) -> None:
    server, client = pods
    url = f"http://{server.ip}:8080/"
    cli = [sys.executable, "-m", "nodeagent.sandbox", "--name", sandbox.name, "-q"]
    subprocess.run([*cli, "agent", "kill", "n1"], check=True, timeout=30)
    killed = time.monotonic()  # the agent is gone (the CLI waited for it)
    # No agent: the in-pod rules stay, so the connection is refused (RST from the empty 15001),
    # never carried in plaintext around the mesh.
    down = sandbox.exec(client, ["curl", "-s", "--max-time", "2", "-o", "/dev/null", url])
    assert down.returncode == 7, f"curl with the agent dead: exit {down.returncode} (7: refused)"
    sandbox.start_agent("n1", wait=False)
    deadline = killed + 30
    while sandbox.exec(
        client, ["curl", "-sf", "--max-time", "1", "-o", "/dev/null", url]
    ).returncode:
        assert time.monotonic() < deadline, "the new agent never served the client"
        time.sleep(0.02)
    window = time.monotonic() - killed
    print(f"kill -9 outage window: {window:.2f}s (agent dead to the first answered request)")
    sandbox.wait_agents_ready(["n1"])
