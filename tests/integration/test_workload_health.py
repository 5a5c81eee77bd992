"""A new replica without a certificate gets no traffic (issue 21, item 8), on a 2-node sandbox.

`web-1` (n2) serves a Service; the CA is stopped; `web-2` is added on n1, whose agent holds no
certificate for `web` and cannot get one, so it registers web-2 Unhealthy. A client sending
requests to the service meanwhile sees no failure and web-2 receives none. The CA starts: web-2
gets its certificate, turns Healthy, and receives traffic.

The service port is plain TCP (`tcp-web`), so nothing retries a failed connection on another
endpoint, and balanced ROUND_ROBIN (peak EWMA would keep preferring the measured, fast web-1 over
a never-measured endpoint): a pick of web-2 before it can terminate mTLS is a failed request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from mesh_helpers import admin, apply, client_pods, curl, eventually, sandbox_fixture

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.store import keys, open_store

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("wh")
VIP = "10.96.78.10"
REQUESTS = 40

# Answers every request with the pod's name (argv[1]), so the client sees who served it.
APP = r"""
import socketserver, sys
name = sys.argv[1].encode()
class Http(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = name + b"\n"
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Http).serve_forever()
"""


def service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "clusterIP": VIP,
            "selector": {"app": "web"},
            "ports": [{"name": "tcp-web", "port": 9090, "targetPort": 8080}],
        },
    }


def round_robin() -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "host": "web.shop.svc.cluster.local",
            "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
        },
    }


def pod_row(sb: Sandbox, node: str, name: str) -> dict[str, Any]:
    found = {p["name"]: p for p in admin(sb, node, "/pods")}
    assert name in found, f"{name} not enrolled on {node}: {sorted(found)}"
    return dict(found[name])


def served_by(sb: Sandbox, client: Pod, n: int) -> tuple[dict[str, int], list[str]]:
    """Send `n` requests (one connection each): {answering pod: count}, and the failures."""
    by: dict[str, int] = {}
    failures = []
    for _ in range(n):
        rc, out = curl(sb, client, f"http://{VIP}:9090/")
        if rc != 0:
            failures.append(f"curl exit {rc}")
            continue
        by[out.strip()] = by.get(out.strip(), 0) + 1
    return by, failures


def workload_revision(sb: Sandbox, node: str, uid: str) -> int:
    async def read() -> int:
        store = await open_store(sb.store_url)
        try:
            kv = await store.get(keys.workload(node, uid))
            assert kv is not None, f"workload {uid} is not registered on {node}"
            return kv.mod_revision
        finally:
            await store.aclose()

    return trio.run(read)


def test_a_replica_without_a_certificate_gets_no_traffic_until_it_has_one(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(APP)
    app = ["python3", str(tmp_path / "app.py")]
    sandbox.pod_add(
        "n2", "shop", "web-1", [*app, "web-1"], service_account="web", labels={"app": "web"}
    )
    client, _ = client_pods(sandbox)
    apply(sandbox, tmp_path, "service", [service(), round_robin()])
    eventually(
        lambda: curl(sandbox, client, f"http://{VIP}:9090/") == (0, "web-1\n"), "web-1 serves"
    )
    assert pod_row(sandbox, "n2", "web-1")["status"] == "Healthy"

    sandbox.stop_ca()
    try:
        web2 = sandbox.pod_add(
            "n1", "shop", "web-2", [*app, "web-2"], service_account="web", labels={"app": "web"}
        )
        row = pod_row(sandbox, "n1", "web-2")
        assert row["status"] == "Unhealthy"  # registered, but n1 holds no certificate for web
        # n1's agent (the client's) has seen web-2's registration before we count.
        revision = workload_revision(sandbox, "n1", web2.uid)
        eventually(
            lambda: admin(sandbox, "n1", "/config_dump")["snapshot"]["revision"] >= revision,
            "n1's snapshot has web-2",
        )
        by, failures = served_by(sandbox, client, REQUESTS)
        assert failures == [], f"{len(failures)} of {REQUESTS} failed: {failures[:3]}"
        assert by == {"web-1": REQUESTS}
        assert pod_row(sandbox, "n1", "web-2")["connections"]["inbound"]["opened"] == 0
        assert pod_row(sandbox, "n1", "web-2")["status"] == "Unhealthy"
    finally:
        sandbox.start_ca()

    eventually(lambda: pod_row(sandbox, "n1", "web-2")["status"] == "Healthy", "web-2 Healthy")
    seen: dict[str, int] = {}
    all_failures: list[str] = []

    def web2_served() -> bool:
        by, failures = served_by(sandbox, client, 5)
        all_failures.extend(failures)
        for name, count in by.items():
            seen[name] = seen.get(name, 0) + count
        return seen.get("web-2", 0) > 0

    eventually(web2_served, "web-2 receives traffic", timeout=60)
    assert all_failures == []
    assert pod_row(sandbox, "n1", "web-2")["connections"]["inbound"]["opened"] > 0
