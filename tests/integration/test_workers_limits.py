"""A DestinationRule's connection limits bound the node, not each worker process
(`--workers 2`, docs/dataplane.md "Processes"): the workers count in one shared table; they
count consecutive errors as one streak; and an outlier ejection in one worker is adopted by the
other.

1-node sandbox; the client pod's connections spread over both workers' 15001 sockets
(SO_REUSEPORT), checked per test from `/workers`. Without the shared table each worker would
allow the limits again (4 live L4 connections instead of 2, twice the HTTP requests served in a
burst), and each would send a failing replica its own 3 consecutive errors (6); with per-worker
streaks and the adoption, up to 5; with one streak, 3.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from l7_helpers import hey_codes, hits
from mesh_helpers import admin, apply, eventually, sandbox_fixture
from snapshot_docs import destination_rule, service

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("wl", nodes=1, workers=2)
ECHO_VIP, HOLD_VIP, EJ_VIP = "10.96.78.10", "10.96.78.11", "10.96.78.12"

ECHO = r"""
import socket, threading
def serve(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
s = socket.create_server(("0.0.0.0", 9000), backlog=64)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# `app.py NAME`: /hold answers after 1.5 s; /fail answers 500 while /tmp/NAME.fail exists (the
# pods share the host's /tmp); one "hit P" line per request.
APP = r"""
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
NAME = sys.argv[1]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        print(f"hit {self.path}", flush=True)
        if self.path.startswith("/hold"):
            time.sleep(1.5)
        failing = self.path.startswith("/fail") and os.path.exists(f"/tmp/{NAME}.fail")
        self.send_response(500 if failing else 200)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

# In the client pod: open N connections one after the other and keep them all open; print how
# many echo a line (the rest were closed by the mesh: 503 UO's L4 form).
HOLDER = r"""
import socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
held, live = [], 0
for i in range(n):
    s = socket.create_connection((vip, 9000), timeout=5)
    held.append(s)
    try:
        s.sendall(b"ping\n")
        live += s.recv(16) == b"ping\n"
    except OSError as e:
        print(i, repr(e), file=sys.stderr)
print(live)
"""


def dr(host: str, policy: dict[str, Any]) -> dict[str, Any]:
    return destination_rule(host, {"trafficPolicy": policy})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits")


@pytest.fixture(scope="module")
def client(sandbox: Sandbox, files: Path) -> Pod:
    d = files
    for name, text in (("echo.py", ECHO), ("app.py", APP), ("holder.py", HOLDER)):
        (d / name).write_text(text)
    sandbox.pod_add(
        "n1", "default", "echo", ["python3", str(d / "echo.py")], labels={"app": "echo"}
    )
    sandbox.pod_add("n1", "default", "hold", ["python3", str(d / "app.py"), "hold"],
                    labels={"app": "hold"})  # fmt: skip
    for i in (1, 2, 3):
        sandbox.pod_add("n1", "default", f"wej-{i}", ["python3", str(d / "app.py"), f"wej-{i}"],
                        labels={"app": "wej"})  # fmt: skip
    pod = sandbox.pod_add("n1", "default", "client", ["sleep", "3600"])
    od = {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "60s",
          "maxEjectionPercent": 100}  # fmt: skip
    docs = [
        service("echo", cluster_ip=ECHO_VIP, port=9000, target=9000, port_name="tcp-echo"),
        service("hold", cluster_ip=HOLD_VIP),
        service("wej", cluster_ip=EJ_VIP),
        dr("echo", {"connectionPool": {"tcp": {"maxConnections": 2}}}),
        dr(
            "hold",
            {
                "connectionPool": {
                    "tcp": {"maxConnections": 2},
                    "http": {"http1MaxPendingRequests": 1},
                }
            },
        ),
        dr("wej", {"loadBalancer": {"simple": "ROUND_ROBIN"}, "outlierDetection": od}),
    ]
    apply(sandbox, d, "limits", docs)
    eventually(lambda: holder(sandbox, pod, d, 1) == 1, "the echo service answers")
    for vip in (HOLD_VIP, EJ_VIP):
        eventually(
            lambda v=vip: (
                sandbox.exec(pod, ["curl", "-sf", "-m", "3", f"http://{v}/up"]).returncode == 0
            ),
            f"{vip} answers",
        )
    return pod


def holder(sb: Sandbox, pod: Pod, d: Path, n: int) -> int:
    r = sb.exec(pod, ["python3", str(d / "holder.py"), ECHO_VIP, str(n)], timeout=60)
    assert r.returncode == 0, r.stderr
    return int(str(r.stdout).strip())


def accepted(sb: Sandbox) -> list[int]:
    body = admin(sb, "n1", "/workers")
    assert body["workers"] == 2
    return [int(p["connections"]) for p in body["processes"]]


def wait_spread(sb: Sandbox, before: list[int], at_least: int) -> list[int]:
    """Each worker's accepted connections since `before`, once at least `at_least` are reported
    and two reads a second apart agree: each worker reports every 0.25 s on its own, so the
    first read past `at_least` can still miss the other worker's latest report (a CI run read
    [0, 13] in this module's first test, whose spread settles at about 9/9 of 18)."""

    def spread() -> list[int]:
        return [a - b for a, b in zip(accepted(sb), before, strict=True)]

    eventually(lambda: sum(spread()) >= at_least, f"{at_least} connections reported")
    last = spread()

    def settled() -> bool:
        nonlocal last
        time.sleep(1.0)
        now, last = last, spread()
        return now == last

    eventually(settled, "the workers' reports settled")
    return last


def test_l4_max_connections_bound_the_node_not_each_worker(
    sandbox: Sandbox, client: Pod, files: Path
) -> None:
    before = accepted(sandbox)
    # 12 connections held open together, opened one by one (no race between the workers).
    live = holder(sandbox, client, files, 12)
    # n1's 15001 takes the client's 12 and 15008 the 2 tunnelled ones (same node).
    spread = wait_spread(sandbox, before, 12)
    print("accepted per worker:", spread)
    assert all(n >= 1 for n in spread), spread  # both workers took some
    assert live == 2


def test_an_http_burst_is_limited_across_the_workers(sandbox: Sandbox, client: Pod) -> None:
    before = accepted(sandbox)
    url = f"http://{HOLD_VIP}/hold"
    r = sandbox.exec(client, ["hey", "-n", "12", "-c", "12", "-t", "20", url], timeout=60)
    codes = hey_codes(str(r.stdout))
    spread = wait_spread(sandbox, before, 12)
    print("codes:", codes, "accepted per worker:", spread)
    assert all(n >= 1 for n in spread), spread
    assert sum(codes.values()) == 12, r.stdout
    # maxConnections 2 + 1 pending: 3 served (a worker whose pool holds none of the cluster's
    # connections may open one past the limit, and two workers can pass a check together:
    # at most 5). Each worker counting alone would serve 6 (3 in each).
    assert 3 <= codes.get(200, 0) <= 5, codes
    assert codes.get(503, 0) >= 7, codes

    # The operator's view (`/config_dump` "worker_breakers", from the workers' reports): the
    # cluster's node-wide counts and each worker's overflows, which add up to the 503s.
    def hold_row() -> dict[str, Any] | None:
        rows = admin(sandbox, "n1", "/config_dump")["worker_breakers"]
        return next((b for b in rows if b["cluster"].endswith("|hold.default.svc.cluster.local")),
                    None)  # fmt: skip

    def overflowed() -> int:
        row = hold_row()
        return -1 if row is None else sum(w["overflow"]["pending"] for w in row["workers"])

    eventually(lambda: overflowed() == codes[503], "the workers reported the overflows")
    row = hold_row()
    assert row is not None
    print("worker_breakers:", row)
    assert len(row["workers"]) == 2
    assert row["node"]["pending"] == 0
    assert 1 <= row["node"]["connections"] <= 3  # the idle connections the pools keep


def test_an_ejection_in_one_worker_is_adopted_by_the_other(
    sandbox: Sandbox, client: Pod, files: Path
) -> None:
    flag = Path("/tmp/wej-2.fail")
    flag.write_text("")
    try:
        before = accepted(sandbox)
        # A new connection per request (spread over the workers), 10/s: an ejection reaches the
        # other worker (worker -> control -> worker) long before the next request.
        url = f"http://{EJ_VIP}/fail"
        r = sandbox.exec(client, ["hey", "-n", "60", "-c", "1", "-q", "10", "-disable-keepalive",
                                  url], timeout=60)  # fmt: skip
        spread = wait_spread(sandbox, before, 60)
    finally:
        flag.unlink()
    failed = hits(sandbox.pod("wej-2", "default")).count("/fail")
    print("codes:", hey_codes(str(r.stdout)), "accepted per worker:", spread, "wej-2:", failed)
    assert min(spread) >= 12, spread  # each worker sent wej-2 its share (every 3rd request)
    # The workers count one streak (the shared table's streak region): ejected at the node's 3rd
    # consecutive 500, whichever worker saw it, and the other adopted the ejection. With
    # per-worker streaks it took up to 2 x (3 - 1) + 1 = 5; alone, each worker would need 3: 6.
    assert failed == 3
    assert hey_codes(str(r.stdout)) == {200: 60 - failed, 500: failed}
