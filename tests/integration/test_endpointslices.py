"""A Service without a selector, served by its EndpointSlice, on a 2-node sandbox.

The Service and its EndpointSlice go into the store through kube-sync's own `Mirror` (the
documents and keys a cluster's kube-sync writes). The slice names a meshed pod and a pod outside
the mesh (`istio.io/dataplane-mode: none`), both on n2; a meshed client on n1 curls the
Service by name: the meshed pod answers through the tunnel (both agents count mTLS), the other
in plaintext, straight from the client's pod. A slice update (the outside pod not ready) and a
slice delete change the endpoints, and `meshctl explain` lists what the agent uses.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kube_objects import mirror
from mesh_helpers import admin, curl, eventually, meshctl, sandbox_fixture
from snapshot_docs import endpoint_slice, service

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("es")
VIP = "10.96.78.10"
URL = "http://ext.shop.svc.cluster.local/"

# Answers "name=<argv[1]> peer=<the address it saw>".
APP = r"""
import socketserver, sys
NAME = sys.argv[1]
class Http(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = f"name={NAME} peer={self.client_address[0]}\n".encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Http).serve_forever()
"""


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pod]:
    d = tmp_path_factory.mktemp("endpointslices")
    (d / "app.py").write_text(APP)
    app = ["python3", str(d / "app.py")]
    meshed = sandbox.pod_add("n2", "shop", "db-0", [*app, "meshed"], service_account="db")
    outside = sandbox.pod_add(
        "n2", "shop", "legacy", [*app, "outside"], labels={"istio.io/dataplane-mode": "none"}
    )
    client = sandbox.pod_add("n1", "client", "sleep", ["sleep", "3600"], service_account="sleep")
    return {"meshed": meshed, "outside": outside, "client": client}


def ext_service() -> dict[str, Any]:
    """The selector-less Service as Kubernetes serves it (kube-sync drops the server fields)."""
    svc = service("ext", None, namespace="shop", cluster_ip=VIP, port=80, target=8080)
    svc["metadata"].update(uid="6f1c9e0a-0000-4000-8000-000000000001", resourceVersion="7")
    return svc


def ext_slice(meshed: Pod, outside: Pod, outside_ready: bool = True) -> dict[str, Any]:
    return endpoint_slice(
        "ext-manual",
        "ext",
        [(meshed.ip, {"ready": True}), (outside.ip, {"ready": outside_ready})],
        namespace="shop",
        ports=[{"name": "http", "protocol": "TCP", "port": 8080}],
    )


def connections(sb: Sandbox, node: str, pod: str) -> dict[str, Any]:
    rows = {p["name"]: p for p in admin(sb, node, "/pods")}
    assert pod in rows, f"{pod} not enrolled on {node}: {sorted(rows)}"
    return dict(rows[pod]["connections"])


def answers(sb: Sandbox, client: Pod, url: str, n: int) -> list[str]:
    """The bodies of `n` requests (curl's exit code must be 0 for each)."""
    out = []
    for _ in range(n):
        rc, body = curl(sb, client, url)
        out.append(body.strip() if rc == 0 else f"curl exit {rc}")
    return out


def explain(sb: Sandbox) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(
        meshctl(sb, "explain", "--from", "client/sleep", "--to", URL, "-o", "json")
    )
    return report


def test_both_endpoints_answer_the_meshed_one_through_the_tunnel(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    meshed, outside, client = pods["meshed"], pods["outside"], pods["client"]
    assert "legacy" not in {p["name"] for p in admin(sandbox, "n2", "/pods")}  # not meshed
    before_out = connections(sandbox, "n1", "sleep")["outbound"]["mtls"]
    before_in = connections(sandbox, "n2", "db-0")["inbound"]["mtls"]
    stats = mirror(sandbox.store_url, ext_service(), ext_slice(meshed, outside))
    assert stats["written"] == 2
    seen: set[str] = set()

    def both_answered() -> bool:
        seen.update(answers(sandbox, client, URL, 4))
        return {f"name=meshed peer={client.ip}", f"name=outside peer={client.ip}"} <= seen

    eventually(both_answered, f"both endpoints answer {URL}", timeout=30)
    # once the agent has the slice, every request is answered by one of the two
    again = answers(sandbox, client, URL, 6)
    assert all(a.startswith("name=") for a in again), again
    # the meshed endpoint was reached over the tunnel: both agents counted it
    assert connections(sandbox, "n1", "sleep")["outbound"]["mtls"] > before_out
    assert connections(sandbox, "n2", "db-0")["inbound"]["mtls"] > before_in
    # by the VIP too
    rc, body = curl(sandbox, client, f"http://{VIP}/")
    assert rc == 0, body
    assert body.startswith("name=")

    report = explain(sandbox)
    (dest,) = report["destinations"]
    assert dest["endpoint_slices"] is True
    by_ip = {e["ip"]: e for e in dest["endpoints"]}
    assert set(by_ip) == {meshed.ip, outside.ip}
    assert by_ip[meshed.ip]["tunnel"] is True
    assert by_ip[meshed.ip]["identity"] == "spiffe://cluster.local/ns/shop/sa/db"
    assert by_ip[outside.ip]["tunnel"] is False
    assert by_ip[outside.ip]["pod"] is None


def test_a_slice_update_and_delete_change_the_endpoints(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    meshed, outside, client = pods["meshed"], pods["outside"], pods["client"]
    mirror(sandbox.store_url, ext_service(), ext_slice(meshed, outside))
    mirror(sandbox.store_url, ext_slice(meshed, outside, outside_ready=False))

    def only_meshed() -> bool:
        return set(answers(sandbox, client, URL, 6)) == {f"name=meshed peer={client.ip}"}

    eventually(only_meshed, "the not-ready endpoint leaves", timeout=30)
    assert [e["ip"] for e in explain(sandbox)["destinations"][0]["endpoints"]] == [meshed.ip]

    stats = mirror(sandbox.store_url, ext_slice(meshed, outside), delete=True)
    assert stats["deleted"] == 1

    def no_endpoints() -> bool:
        return explain(sandbox)["destinations"][0]["endpoints"] == [] and all(
            a.startswith("curl exit") for a in answers(sandbox, client, URL, 3)
        )

    eventually(no_endpoints, "no endpoints once the slice is deleted", timeout=30)
