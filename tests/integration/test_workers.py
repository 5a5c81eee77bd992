"""`nodeagent run --workers 2` on a sandbox (docs/dataplane.md, "Processes"): both worker
processes serve the pods (SO_REUSEPORT), 15020 counts every request exactly once, a worker
killed with -9 is respawned while the other serves on (totals never go back), a certificate
rotation and a VirtualService reach every worker, the respawned one included.

Client on n1, server on n2, a Service VIP in front: n1's workers run the L7 proxy and the
HBONE client, n2's the tunnel server. The CA issues 20-second certificates (renewed every ~10 s).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from l7_helpers import hey_codes
from mesh_helpers import admin, apply, eventually, meshctl, sandbox_fixture
from snapshot_docs import service

import nodeagent.demo.backend
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry.exposition import parse

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("wk", workers=2, ca_ttl="20s")
BACKEND = ["python3", "-I", str(Path(nodeagent.demo.backend.__file__)), "v1", "8080"]
VIP = "10.96.79.10"
URL = f"http://{VIP}/"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
NODEAGENT = str(Path(sys.prefix) / "bin" / "nodeagent")


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pod, Pod, Path]:
    d = tmp_path_factory.mktemp("workers")
    server = sandbox.pod_add(
        "n2", "default", "server", BACKEND, labels={"app": "server"}, service_account="server"
    )
    client = sandbox.pod_add("n1", "default", "client", ["sleep", "3600"], service_account="client")
    apply(sandbox, d, "svc", [service("server", cluster_ip=VIP, port=80, target=8080)])
    eventually(
        lambda: sandbox.exec(client, ["curl", "-sf", "--max-time", "2", URL]).returncode == 0,
        f"{URL} answers through the mesh",
        timeout=30,
    )
    return server, client, d


def processes(sb: Sandbox, node: str) -> list[dict[str, Any]]:
    body = admin(sb, node, "/workers")
    assert body["workers"] == 2
    return list(body["processes"])


def requests_total(sb: Sandbox) -> float:
    """n1's istio_requests_total (reporter=source) towards the server, as 15020 renders it."""
    url = "http://127.0.0.1:15020/stats/prometheus"
    argv = ["ip", "netns", "exec", sb.node("n1").netns, "curl", "-sf", "--max-time", "5", url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    assert r.returncode == 0, r.stderr
    fam = parse(str(r.stdout)).get("istio_requests_total")
    if fam is None:
        return 0.0
    return sum(
        s.value
        for s in fam.samples
        if s.labels.get("reporter") == "source"
        and s.labels.get("destination_service_name") == "server"
    )


def wait_fresh_reports(sb: Sandbox) -> None:
    """Until every n1 worker has reported twice more: what they counted before is on 15020."""
    seen = {p["pid"]: p["reports"] for p in processes(sb, "n1")}
    eventually(
        lambda: all(
            p["pid"] in seen and p["reports"] >= seen[p["pid"]] + 2 for p in processes(sb, "n1")
        ),
        "fresh reports from every worker",
    )


def hey(sb: Sandbox, client: Pod, *flags: str, timeout: float = 120) -> dict[int, int]:
    r = sb.exec(client, ["hey", "-t", "10", *flags, URL], timeout=timeout)
    assert r.returncode == 0, r.stderr
    return hey_codes(str(r.stdout))


def test_connections_are_served_by_every_worker(
    sandbox: Sandbox, pods: tuple[Pod, Pod, Path]
) -> None:
    _, client, _ = pods
    before = {n: [p["connections"] for p in processes(sandbox, n)] for n in ("n1", "n2")}
    assert hey(sandbox, client, "-n", "200", "-c", "10", "-disable-keepalive") == {200: 200}

    def both_served(node: str) -> bool:
        now = [p["connections"] for p in processes(sandbox, node)]
        return all(a > b for a, b in zip(now, before[node], strict=True))

    # n1: 200 client connections spread over both workers' 15001 sockets.
    eventually(lambda: both_served("n1"), "both of n1's workers accepted client connections")
    rows = processes(sandbox, "n1")
    print("n1 workers:", [(p["pid"], p["connections"]) for p in rows])
    assert len({p["pid"] for p in rows}) == 2
    assert all(p["up"] and p["pods"] == 1 for p in rows)
    # n2 serves its pod in both workers too (each has the pod's listeners).
    assert all(p["up"] and p["pods"] == 1 for p in processes(sandbox, "n2"))
    # The operator's view of the same: one row per process.
    argv = [NODEAGENT, "admin", "--socket", str(sandbox.node("n1").admin_socket), "workers"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=True).stdout
    assert out.splitlines()[0] == "workers: 2"
    assert {line.split()[1] for line in out.splitlines()[2:]} == {str(p["pid"]) for p in rows}


def test_metrics_count_every_request_exactly_once(
    sandbox: Sandbox, pods: tuple[Pod, Pod, Path]
) -> None:
    _, client, _ = pods
    wait_fresh_reports(sandbox)  # every earlier request is in the sum
    before = requests_total(sandbox)
    assert hey(sandbox, client, "-n", "300", "-c", "10", "-disable-keepalive") == {200: 300}
    wait_fresh_reports(sandbox)
    assert requests_total(sandbox) == before + 300  # each counted once, none lost


def test_certificate_rotation_reaches_every_worker(
    sandbox: Sandbox, pods: tuple[Pod, Pod, Path]
) -> None:
    _, client, _ = pods

    def control_serial() -> str | None:
        rows = {r["identity"]: r for r in admin(sandbox, "n1", "/certs")}
        row = rows.get(CLIENT_ID)
        return str(row["serial"]) if row and row.get("serial") else None

    first = control_serial()
    assert first is not None
    eventually(lambda: control_serial() not in (None, first), "the certificate renews", 30)
    renewed = control_serial()
    eventually(
        lambda: all(
            p["identity"].get("serials", {}).get(CLIENT_ID) == control_serial()
            for p in processes(sandbox, "n1")
        ),
        f"every n1 worker holds the renewed certificate ({renewed})",
    )
    # ...and uses it: new connections from both workers still pass the server's mTLS check.
    assert hey(sandbox, client, "-n", "100", "-c", "5", "-disable-keepalive") == {200: 100}


def test_a_killed_worker_is_respawned_while_the_other_serves(
    sandbox: Sandbox, pods: tuple[Pod, Pod, Path]
) -> None:
    _, client, _ = pods
    victim, other = processes(sandbox, "n1")
    totals: list[float] = []
    respawned_at: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            totals.append(requests_total(sandbox))
            if not respawned_at and respawned():
                respawned_at.append(time.monotonic())
            time.sleep(0.2)

    def respawned() -> bool:
        row = processes(sandbox, "n1")[0]
        return bool(row["up"]) and row["pid"] != victim["pid"] and row["restarts"] >= 1

    sampler = threading.Thread(target=sample)
    load = sandbox.popen(
        client,
        ["hey", "-z", "6s", "-c", "10", "-q", "15", "-t", "10", "-disable-keepalive", URL],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    sampler.start()
    try:
        time.sleep(2.0)
        os.kill(int(victim["pid"]), signal.SIGKILL)  # a worker of our own sandbox's agent
        killed_at = time.monotonic()
        out, err = load.communicate(timeout=60)
    finally:
        load.kill()
        load.wait()
        stop.set()
        sampler.join()
    assert load.returncode == 0, err
    codes = hey_codes(out)
    ok = codes.get(200, 0)
    errors = out.split("Error distribution:")[-1] if "Error distribution:" in out else ""
    lost = sum(n for c, n in codes.items() if c != 200)
    lost += sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", errors, re.MULTILINE))
    print(f"kill -9 of worker {victim['pid']}: {codes}, errors: {errors.strip()!r}")
    assert ok >= 500, f"the load really ran, and mostly passed: {codes}"
    # Only the connections the dead worker had open fail (10 concurrent at most, each retried
    # by nobody): a small bound, not an outage.
    assert lost <= 30, f"{lost} failed requests around the kill: {codes} {errors}"

    eventually(respawned, "the killed worker is respawned", timeout=20)
    if respawned_at:  # seen by the sampler, during the load (±0.2 s)
        print(f"respawned and serving {respawned_at[0] - killed_at:.2f}s after the kill")
    assert all(a <= b for a, b in itertools.pairwise(totals)), totals
    # The other worker was not disturbed: same process, never restarted.
    survivor = processes(sandbox, "n1")[1]
    assert (survivor["pid"], survivor["incarnation"]) == (other["pid"], other["incarnation"])
    # The respawned worker serves again, with the pod and the config of the others.
    before = processes(sandbox, "n1")[0]["connections"]
    assert hey(sandbox, client, "-n", "200", "-c", "10", "-disable-keepalive") == {200: 200}
    eventually(
        lambda: processes(sandbox, "n1")[0]["connections"] > before,
        "the respawned worker accepts connections",
    )
    assert requests_total(sandbox) >= totals[-1]


def test_a_virtual_service_reaches_every_worker(
    sandbox: Sandbox, pods: tuple[Pod, Pod, Path]
) -> None:
    _, client, d = pods
    route = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "server-teapot", "namespace": "default"},
        "spec": {
            "hosts": ["server"],
            "http": [
                {
                    "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                    "route": [{"destination": {"host": "server"}}],
                }
            ],
        },
    }
    path = apply(sandbox, d, "teapot", [route])
    try:
        # One 418 proves the control process holds the route (a worker's snapshot is the
        # control's); then every worker must reach the control's revision.
        eventually(
            lambda: hey(sandbox, client, "-n", "1", "-c", "1") == {418: 1}, "the route applies"
        )
        revision = admin(sandbox, "n1", "/config_dump")["snapshot"]["revision"]
        eventually(
            lambda: all(p["snapshot_revision"] >= revision for p in processes(sandbox, "n1")),
            "every n1 worker holds the control's snapshot revision",
        )
        before = [p["connections"] for p in processes(sandbox, "n1")]
        # Every connection, whichever worker accepts it, is answered by the VirtualService.
        assert hey(sandbox, client, "-n", "200", "-c", "10", "-disable-keepalive") == {418: 200}
        eventually(
            lambda: all(
                p["connections"] > b for p, b in zip(processes(sandbox, "n1"), before, strict=True)
            ),
            "both workers served some of the 418s",
        )
    finally:
        meshctl(sandbox, "delete", "-f", str(path))
    eventually(lambda: hey(sandbox, client, "-n", "20", "-c", "2") == {200: 20}, "route removed")


@pytest.mark.parametrize("takeover", [False, True], ids=["sigterm-first", "takeover"])
def test_graceful_restart_with_workers_fails_no_request(
    sandbox: Sandbox, pods: tuple[Pod, Pod, Path], takeover: bool
) -> None:
    """The handover of docs/dataplane.md "Restarts" with two workers on each side: the old
    agent's workers keep accepting until the new agent (and its workers) serve every pod."""
    _, client, _ = pods
    load = sandbox.popen(
        client,
        ["hey", "-z", "7s", "-c", "10", "-q", "20", "-t", "10", "-disable-keepalive", URL],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    try:
        time.sleep(1.5)
        sandbox.restart_agent("n1", takeover=takeover)
        out, err = load.communicate(timeout=60)
    finally:
        load.kill()
        load.wait()
    assert load.returncode == 0, err
    codes = hey_codes(out)
    assert "Error distribution" not in out, out
    assert set(codes) == {200}, codes
    assert codes[200] >= 500, codes
    rows = processes(sandbox, "n1")
    assert all(p["up"] and p["pods"] == 1 for p in rows)
