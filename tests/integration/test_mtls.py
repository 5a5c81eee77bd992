"""The mTLS data plane on a 2-node sandbox: real CA, real agents, real curl, real tcpdump.

A client pod on n1 reaches a server pod on n2 through the service VIP; both agents tunnel it
(15008, TLS 1.3, SPIFFE certificates from the sandbox CA). Checked: the app sees the client's
pod IP, 1 GiB arrives intact, the underlay carries no plaintext, STRICT refuses a client that
is not in the mesh, and AuthorizationPolicy allows and denies.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mesh_helpers import admin, apply, client_pods, curl, eventually, meshctl, sandbox_fixture
from snapshot_docs import service

from nodeagent.contract import DNS_CAPTURE_PORT, METRICS_PORT, TUNNEL_PORT
from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("mt")
VIP = "10.96.77.10"

# The app: HTTP on 8080 answers with the peer address it saw; 9000 is a sink that answers
# "<bytes> <sha256>" after the client's EOF.
APP = r"""
import hashlib, socket, socketserver, threading
class Http(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = f"peer={self.client_address[0]}\n".encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        h, n = hashlib.sha256(), 0
        while chunk := self.request.recv(1 << 20):
            h.update(chunk); n += len(chunk)
        self.request.sendall(f"{n} {h.hexdigest()}".encode())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
sink = socketserver.ThreadingTCPServer(("0.0.0.0", 9000), Sink)
threading.Thread(target=sink.serve_forever, daemon=True).start()
socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Http).serve_forever()
"""

# 1 GiB of random bytes (one random MiB repeated), sent as fast as Python can, then EOF.
SENDER = r"""
import hashlib, os, socket, sys
block = os.urandom(1 << 20); h = hashlib.sha256()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
for _ in range(1024):
    s.sendall(block); h.update(block)
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
print(f"{1 << 30} {h.hexdigest()}|{reply.decode()}")
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mtls")
    (d / "app.py").write_text(APP)
    (d / "sender.py").write_text(SENDER)
    return d


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    server = sandbox.pod_add(
        "n2", "shop", "web", ["python3", str(files / "app.py")],
        service_account="web", labels={"app": "web"},
    )  # fmt: skip
    client, outsider = client_pods(sandbox)
    apply(sandbox, files, "service", [web_service()])
    return {"server": server, "client": client, "outsider": outsider}


def web_service() -> dict[str, Any]:
    return service(
        "web",
        namespace="shop",
        cluster_ip=VIP,
        ports=[
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "tcp-sink", "port": 9000, "targetPort": 9000},
        ],
    )


def policy(name: str, action: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": action, "rules": rules},
    }


def stats(sb: Sandbox, node: str, name: str) -> dict[str, Any]:
    found = {p["name"]: p for p in admin(sb, node, "/pods")}
    assert name in found, f"{name} not enrolled on {node}: {sorted(found)}"
    return dict(found[name]["connections"])


def served(sb: Sandbox, pod: Pod, url: str, expect: str) -> Callable[[], bool]:
    def check() -> bool:
        rc, out = curl(sb, pod, url)
        return rc == 0 and expect in out

    return check


def refused(sb: Sandbox, pod: Pod, url: str) -> Callable[[], bool]:
    return lambda: curl(sb, pod, url)[0] != 0


def test_curl_to_service_vip_goes_through_the_tunnel(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    client = pods["client"]
    before = stats(sandbox, "n1", "sleep")["outbound"]["mtls"]
    eventually(served(sandbox, client, f"http://{VIP}/", f"peer={client.ip}"), "curl VIP")
    # The app saw the client pod's own IP; the client's agent tunneled it.
    assert stats(sandbox, "n1", "sleep")["outbound"]["mtls"] > before
    assert stats(sandbox, "n2", "web")["inbound"]["mtls"] > 0


def test_1gib_arrives_intact_and_the_underlay_shows_only_tls(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    client = pods["client"]
    eventually(served(sandbox, client, f"http://{VIP}/", "peer="), "service ready")
    capture, status = files / "underlay.txt", files / "tcpdump.err"
    with capture.open("w") as out, status.open("w") as err:
        # Every byte between pods, not the nodes' metrics port: plaintext HTTP by
        # contract (Istio's), scraped over the underlay by the sandbox's console.
        argv = ["tcpdump", "-i", "any", "-l", "-n", "-A", "-s", "256"]
        dump = sandbox.popen(
            "underlay", [*argv, f"tcp and not port {METRICS_PORT}"],
            stdout=out, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            # tcpdump says "listening on …" once its capture is open: from then on it sees all.
            eventually(lambda: "listening on" in status.read_text(), "tcpdump listening", 10)
            marker = "PLAINTEXT-MARKER-0123456789"
            rc, body = curl(sandbox, client, f"http://{VIP}/{marker}")
            assert rc == 0, body
            started = time.monotonic()
            r = sandbox.exec(
                client, ["python3", str(files / "sender.py"), VIP, "9000"], timeout=240
            )
            elapsed = time.monotonic() - started
            # The capture has caught up with the tunnel traffic (-l: one line per packet as it
            # comes) before tcpdump is stopped; the marker's packets came long before.
            eventually(lambda: ".15008" in capture.read_text(errors="replace"), "tunnel seen", 10)
        finally:
            os.killpg(dump.pid, signal.SIGTERM)
            dump.wait(timeout=10)
    assert r.returncode == 0, r.stderr
    sent, received = r.stdout.strip().split("|")
    assert sent == received, f"sender {sent} != receiver {received}"
    print(f"1 GiB through two agents in {elapsed:.1f}s ({8 / elapsed:.2f} Gbit/s)")
    text = capture.read_text(errors="replace")
    assert ".15008" in text, "the capture saw no tunnel traffic: it proves nothing"
    assert marker not in text
    assert "GET /" not in text
    assert "HTTP/1.1" not in text


def test_strict_refuses_a_client_outside_the_mesh(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    server, outsider, client = pods["server"], pods["outsider"], pods["client"]
    direct = f"http://{server.ip}:8080/"
    eventually(served(sandbox, outsider, direct, f"peer={outsider.ip}"), "PERMISSIVE accepts")
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    path = apply(sandbox, files, "strict", [strict])
    try:
        eventually(refused(sandbox, outsider, direct), "STRICT refuses plaintext")
        # A meshed client still gets in (mTLS).
        assert served(sandbox, client, direct, f"peer={client.ip}")()
    finally:
        meshctl(sandbox, "delete", "-f", str(path))
    eventually(served(sandbox, outsider, direct, "peer="), "PERMISSIVE again")


def test_authorization_policy_allow_and_deny(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    client = pods["client"]
    url = f"http://{VIP}/"
    eventually(served(sandbox, client, url, "peer="), "allowed without policies")
    deny = policy("deny-client", "DENY", [{"from": [{"source": {"namespaces": ["client"]}}]}])
    path = apply(sandbox, files, "deny", [deny])
    try:
        eventually(refused(sandbox, client, url), "DENY from namespace client")
    finally:
        meshctl(sandbox, "delete", "-f", str(path))
    eventually(served(sandbox, client, url, "peer="), "allowed after the DENY is gone")
    allow_other = policy(
        "allow-other",
        "ALLOW",
        [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}]}],
    )
    path = apply(sandbox, files, "allow-other", [allow_other])
    try:
        eventually(refused(sandbox, client, url), "deny by default once an ALLOW selects")
        allow_me = policy(
            "allow-sleep",
            "ALLOW",
            [{"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}],
        )
        path2 = apply(sandbox, files, "allow-me", [allow_me])
        try:
            eventually(served(sandbox, client, url, "peer="), "ALLOW by principal")
        finally:
            meshctl(sandbox, "delete", "-f", str(path2))
    finally:
        meshctl(sandbox, "delete", "-f", str(path))


def test_pods_resolve_mesh_names_through_the_dns_proxy(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    """Port 53 is captured in the pod: service names answer with the VIP, a headless service
    with its pods' IPs, and curl by name reaches the app through the tunnel."""
    client, server = pods["client"], pods["server"]
    headless = web_service()
    headless["metadata"]["name"] = "web-pods"
    headless["spec"]["clusterIP"] = "None"
    apply(sandbox, files, "headless", [headless])

    def dig(name: str, *flags: str) -> str:
        r = sandbox.exec(client, ["dig", "+short", "+time=2", "+tries=1", *flags, name], timeout=10)
        return str(r.stdout).strip()

    eventually(lambda: dig("web.shop.svc.cluster.local") == VIP, "A web.shop.svc.cluster.local")
    assert dig("web.shop", "+tcp") == VIP  # TCP too, and the short form
    eventually(lambda: dig("web-pods.shop.svc.cluster.local") == server.ip, "headless A")
    url = "http://web.shop.svc.cluster.local/"
    eventually(served(sandbox, client, url, f"peer={client.ip}"), "curl by name")
    # the admin socket lists what the agent serves in the pod
    (row,) = [p for p in admin(sandbox, "n1", "/pods") if p["name"] == "sleep"]
    served_here = {(x["role"], x["protocol"], x["address"]) for x in row["listeners"]}
    assert ("dns", "udp", f"127.0.0.1:{DNS_CAPTURE_PORT}") in served_here
    assert ("tunnel", "tcp", f"0.0.0.0:{TUNNEL_PORT}") in served_here
