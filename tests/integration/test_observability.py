"""Telemetry of real traffic on a 2-node sandbox: Istio metrics scraped by a real Prometheus,
access-log lines in the agents' logs, and Zipkin spans linked across the two agents.

A client pod on n1 calls `my-app` (v1 and v2 on n2) through a header route (30 requests to v1,
10 with `x-version: v2`) and an L4 port of the same pods (10 connections); the outside host
calls through n1's ingress gateway (5 requests), and an opted-out pod reaches v1 in plaintext
(15006, 3 connections). Prometheus (Debian `prometheus`) runs in the outside host's netns,
scrapes both agents' 15020 over the underlay, and
`sum by (destination_version) (istio_requests_total{reporter="source"})` must equal the split the
client received. A minimal Zipkin collector (stdlib HTTP server, outside host) receives n1's
CLIENT spans and n2's SERVER spans, one per request (n2 parses the HTTP port), each the child
of its request's CLIENT span.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from l7_helpers import write_app
from mesh_helpers import apply, http_gateway, json_lines, wait_config
from snapshot_docs import service

from nodeagent.contract import METRICS_PATH, METRICS_PORT
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.sandbox.layout import OUTSIDE_IP
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]
NAME = f"ob{os.getpid() % 100000}"
VIP = "10.96.82.10"
TCP_VIP = "10.96.82.11"
ZIPKIN_PORT = 9411
PROM_PORT = 9090
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
T = TypeVar("T")

# Zipkin's POST /api/v2/spans, good enough for a test: every body goes to the file, one per line.
COLLECTOR = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
OUT = sys.argv[1]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path == "/api/v2/spans":
            with open(OUT, "ab") as f:
                f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(202 if self.path == "/api/v2/spans" else 404)
        self.send_header("content-length", "0")
        self.end_headers()
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"""


def wait_for(get: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.5)  # polling real processes, not a unit test


def _stop(proc: subprocess.Popen[Any]) -> None:
    # `ip netns exec` execs the program, so proc.pid is the program itself.
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("observability")


@pytest.fixture(scope="module")
def sandbox(files: Path) -> Iterator[Sandbox]:
    zipkin = f"http://{OUTSIDE_IP}:{ZIPKIN_PORT}/api/v2/spans"
    agent = ["--zipkin-url", zipkin, "--sample-rate", "1"]
    sb = Sandbox.up(NAME, nodes=2, store="sqlite", progress=False, agent_args=agent, gateway="n1")
    procs: list[subprocess.Popen[Any]] = []
    try:
        (files / "collector.py").write_text(COLLECTOR)
        spans = files / "spans.jsonl"
        spans.touch()
        with (files / "collector.log").open("wb") as log:
            procs.append(
                sb.popen("outside", [sys.executable, str(files / "collector.py"), str(spans),
                                     str(ZIPKIN_PORT)], stdout=log, stderr=subprocess.STDOUT)
            )  # fmt: skip
        targets = ", ".join(f"'{n.underlay_ip}:15020'" for n in sb.nodes())
        config = files / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: nodeagent\n    metrics_path: /stats/prometheus\n"
            f"    static_configs:\n      - targets: [{targets}]\n"
        )
        with (files / "prometheus.log").open("wb") as plog:
            procs.append(
                sb.popen(
                    "outside",
                    ["prometheus", f"--config.file={config}",
                     f"--storage.tsdb.path={files / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{PROM_PORT}"],
                    stdout=plog, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        yield sb
    finally:
        for proc in procs:
            _stop(proc)
        sb.down()


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    app = write_app(files)
    client = sandbox.pod_add(
        "n1", "default", "client", ["sleep", "3600"], service_account="client",
        labels={"app": "client"},
    )  # fmt: skip
    # Outside the mesh (opted out): its connections to a mesh pod land on 15006 in plaintext.
    plain = sandbox.pod_add(
        "n1", "default", "plain", ["sleep", "3600"], labels={"istio.io/dataplane-mode": "none"}
    )
    out = {"client": client, "plain": plain}
    for v in ("v1", "v2"):
        out[v] = sandbox.pod_add(
            "n2", "default", f"my-app-{v}", [*app, f"my-app-{v}", "8080"],
            service_account="my-app", labels={"app": "my-app", "version": v},
        )  # fmt: skip
    tcp = service("my-app-tcp", {"app": "my-app"}, cluster_ip=TCP_VIP, port=9000)
    tcp["spec"]["ports"][0]["name"] = "tcp-app"  # an L4 port: no HTTP parsing, TCP metrics
    route = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "my-app", "namespace": "default"},
        "spec": {
            "hosts": ["my-app"],
            "http": [
                {"match": [{"headers": {"x-version": {"exact": "v2"}}}],
                 "route": [{"destination": {"host": "my-app", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "my-app", "subset": "v1"}}]},
            ],
        },
    }  # fmt: skip
    subsets = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "my-app", "namespace": "default"},
        "spec": {
            "host": "my-app",
            "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
        },
    }
    gateway = http_gateway("obs-gateway")
    from_gateway = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "my-app-gateway", "namespace": "default"},
        "spec": {
            "hosts": ["*"],
            "gateways": ["obs-gateway"],
            "http": [{"route": [{"destination": {"host": "my-app", "subset": "v2",
                                                 "port": {"number": 80}}}]}],
        },
    }  # fmt: skip
    docs = [service("my-app", cluster_ip=VIP), tcp, subsets, route, gateway, from_gateway]
    apply(sandbox, files, "my-app", docs)
    # Both agents hold the config before the first request: a request n1 routes while n2 does
    # not know the Service yet is relayed at L4 there (no SERVER span), so the span count below
    # would never reach the requests sent.
    for node in ("n1", "n2"):
        wait_config(sandbox, node)
    return out


def _curl_loop(sb: Sandbox, pod: Pod | str, url: str, n: int, *headers: str) -> list[str]:
    """n requests, one curl each (a new client connection each), → the versions answering."""
    h = " ".join(f"-H '{x}'" for x in headers)
    script = f"for i in $(seq {n}); do curl -s --max-time 5 {h} {url}; echo; done"
    r = sb.exec(pod, ["sh", "-c", script], timeout=120)
    return [
        line.split()[0].removeprefix("version=my-app-")
        for line in str(r.stdout).splitlines()
        if line.startswith("version=")
    ]


def _scrape(sb: Sandbox, node: str) -> str:
    url = f"http://{sb.node(node).underlay_ip}:{METRICS_PORT}{METRICS_PATH}"
    r = sb.exec("outside", ["curl", "-sf", "--max-time", "5", url], timeout=15)
    assert r.returncode == 0, r.stderr
    return str(r.stdout)


def _sum(text: str, name: str, **match: str) -> float:
    return sum(
        s.value for s in samples(text, name) if all(s.labels.get(k) == v for k, v in match.items())
    )


def _at_least(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]] | None:
    return items if len(items) >= n else None


def test_metrics_access_logs_and_traces(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    client = pods["client"]
    url = f"http://{VIP}/hello"
    # The route is in place once a header request reaches v2 (these count too: we track all).
    sent: Counter[str] = Counter()

    def routed() -> bool | None:
        got = _curl_loop(sandbox, client, url, 1, "x-version: v2")
        sent.update(got)
        return True if got == ["v2"] else None

    wait_for(routed, "the header route to v2")
    traced = _curl_loop(sandbox, client, url, 1, f"traceparent: 00-{TRACE}-{PARENT}-01")
    assert traced == ["v1"]
    sent.update(traced)
    v1 = _curl_loop(sandbox, client, url, 29)
    v2 = _curl_loop(sandbox, client, url, 10, "x-version: v2")
    assert (v1, v2) == (["v1"] * 29, ["v2"] * 10)
    sent.update(v1 + v2)
    tcp = _curl_loop(sandbox, client, f"http://{TCP_VIP}:9000/tcp", 10)
    assert len(tcp) == 10, tcp
    gw_url = f"{sandbox.gateway_url()}/gw"
    via_gateway: list[str] = []

    def gateway_routes() -> bool | None:
        via_gateway.extend(_curl_loop(sandbox, "outside", gw_url, 1))
        return True if via_gateway else None

    wait_for(gateway_routes, "the gateway route")
    via_gateway += _curl_loop(sandbox, "outside", gw_url, 4)
    assert via_gateway == ["v2"] * 5
    plaintext = _curl_loop(sandbox, pods["plain"], f"http://{pods['v1'].ip}:8080/plain", 3)
    assert plaintext == ["v1"] * 3

    # -- a real Prometheus, scraping both agents over the underlay -----------------------------
    query = (
        'sum by (destination_version) (istio_requests_total{reporter="source",'
        'source_workload="client",destination_service_name="my-app",response_code="200"})'
    )

    def prometheus_agrees() -> dict[str, float] | None:
        r = sandbox.exec("outside", ["curl", "-s", "--max-time", "3",
                                     f"http://127.0.0.1:{PROM_PORT}/api/v1/query",
                                     "--data-urlencode", f"query={query}"], timeout=15)  # fmt: skip
        try:
            answer = json.loads(r.stdout)
        except ValueError:
            return None
        got = {
            x["metric"].get("destination_version", "?"): float(x["value"][1])
            for x in answer.get("data", {}).get("result", [])
        }
        return got if got == {k: float(v) for k, v in sent.items()} else None

    wait_for(prometheus_agrees, f"Prometheus: {query} == {dict(sent)}", timeout=40)
    assert sent["v1"] >= 30
    assert sent["v2"] >= 11

    # -- TCP metrics on both agents (the strict exposition parser reads them) -------------------
    n1, n2 = _scrape(sandbox, "n1"), _scrape(sandbox, "n2")
    tcp_src = {"reporter": "source", "destination_service_name": "my-app-tcp"}
    assert _sum(n1, "istio_tcp_connections_opened_total", **tcp_src) == 10
    assert _sum(n1, "istio_tcp_connections_closed_total", **tcp_src) == 10
    assert _sum(n1, "istio_tcp_received_bytes_total", **tcp_src) > 10 * len("GET /tcp HTTP/1.1")
    assert _sum(n1, "istio_tcp_sent_bytes_total", **tcp_src) > 10 * len("version=my-app-v1")
    (opened,) = [s for s in samples(n1, "istio_tcp_connections_opened_total")
                 if s.labels["destination_service_name"] == "my-app-tcp"
                 and s.labels["destination_version"] == "v1"]  # fmt: skip
    assert opened.labels["source_workload"] == "client"
    assert opened.labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"
    assert opened.labels["destination_principal"] == "spiffe://cluster.local/ns/default/sa/my-app"
    assert opened.labels["connection_security_policy"] == "mutual_tls"
    dst = {
        "reporter": "destination",
        "source_workload": "client",
        "source_principal": "spiffe://cluster.local/ns/default/sa/client",
        "connection_security_policy": "mutual_tls",
    }
    # 10 L4 connections plus the pooled HTTP tunnels (at least one per version).
    assert _sum(n2, "istio_tcp_connections_opened_total", **dst) >= 12
    assert _sum(n2, "istio_tcp_connections_closed_total", **dst) >= 10
    assert _sum(n2, "istio_tcp_received_bytes_total", **dst) > 0
    assert _sum(n2, "istio_tcp_sent_bytes_total", destination_app="my-app", **dst) > 0
    assert _sum(n1, "istio_request_duration_milliseconds_count", reporter="source") >= 45
    inbound = {"reporter": "destination", "connection_security_policy": "none"}
    assert _sum(n2, "istio_tcp_connections_closed_total", **inbound) == 3
    (plain_sample,) = [
        s for s in samples(n2, "istio_tcp_connections_opened_total")
        if s.labels["connection_security_policy"] == "none"
    ]  # fmt: skip
    assert plain_sample.value == 3
    assert plain_sample.labels["source_workload"] == "unknown"
    assert plain_sample.labels["destination_workload"] == "my-app-v1"
    assert plain_sample.labels["destination_service_name"] == "my-app"
    gw = {"source_workload": "istio-ingressgateway-n1", "source_workload_namespace": "istio-system"}
    assert (
        _sum(n1, "istio_requests_total", destination_version="v2", response_code="200", **gw) == 5
    )
    gw_principal = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    assert _sum(n1, "istio_requests_total", source_principal=gw_principal) == 5

    # -- access logs: one line per request (n1) and per connection (both) ------------------------
    log1, log2 = sandbox.node("n1").agent_log, sandbox.node("n2").agent_log

    def request_lines() -> list[dict[str, Any]] | None:
        all_lines = json_lines(log1, "access.request")
        lines = [x for x in all_lines if x["path"] == "/hello"]
        gateway = [x for x in all_lines if x["path"] == "/gw"]
        return lines if len(lines) >= sum(sent.values()) and len(gateway) >= 5 else None

    lines = wait_for(request_lines, "n1's access.request lines")
    first = next(x for x in lines if x["trace_id"] == TRACE)
    assert (first["method"], first["authority"], first["path"]) == ("GET", VIP, "/hello")
    assert (first["response_code"], first["response_flags"], first["protocol"]) == (
        200,
        "-",
        "http",
    )
    assert first["bytes_sent"] > 0
    assert first["bytes_received"] > 0
    assert first["duration_ms"] > 0
    assert first["upstream_host"] == f"{pods['v1'].ip}:8080"
    assert first["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"
    assert first["destination_principal"] == "spiffe://cluster.local/ns/default/sa/my-app"
    assert len(first["request_id"]) == 36
    assert first["reporter"] == "source"
    assert len({x["request_id"] for x in lines}) == len(lines)
    gw_lines = [x for x in json_lines(log1, "access.request") if x["path"] == "/gw"]
    assert len(gw_lines) == 5
    assert {x["namespace"] for x in gw_lines} == {"istio-system"}
    assert {x["source_principal"] for x in gw_lines} == {gw_principal}
    conns1 = wait_for(lambda: _at_least(json_lines(log1, "access.connection"), 10), "n1 lines")
    assert all(c["protocol"] == "tcp" and c["reporter"] == "source" for c in conns1)
    # 10 L4 connections (+ tunnels closed so far) from the client, 3 plaintext ones (15006).
    conns2 = wait_for(lambda: _at_least(json_lines(log2, "access.connection"), 13), "n2 lines")
    assert {c["reporter"] for c in conns2} == {"destination"}
    principals = Counter(c["source_principal"] for c in conns2)
    assert principals["spiffe://cluster.local/ns/default/sa/client"] >= 10
    assert principals["unknown"] == 3
    assert set(principals) == {"spiffe://cluster.local/ns/default/sa/client", "unknown"}

    # -- spans: n1's CLIENT spans; n2's SERVER spans, one per request on the HTTP port (the
    # destination parses it), each the child of its request's CLIENT span; the 3 plaintext
    # requests (no trace context) start their own traces at n2.
    assert sandbox.pod_del("client")
    spans_file = files / "spans.jsonl"
    expected = sum(sent.values()) + 5  # the client's requests and the gateway's

    def linked() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]] | None:
        spans = [s for line in spans_file.read_text().splitlines() for s in json.loads(line)]
        clients = [s for s in spans if s["kind"] == "CLIENT"]
        servers = [s for s in spans if s["kind"] == "SERVER"]
        mine = [s for s in clients if s["traceId"] == TRACE]
        if not mine or len([s for s in servers if "parentId" in s]) < expected:
            return None
        return mine[0], clients, servers

    mine, clients, servers = wait_for(linked, "n1's CLIENT and n2's SERVER spans", timeout=20)
    assert mine["parentId"] == PARENT
    assert mine["localEndpoint"]["serviceName"] == "n1"
    assert mine["tags"]["http.status_code"] == "200"
    assert len(clients) >= sum(sent.values())
    by_id = {s["id"]: s for s in clients}
    (traced,) = [s for s in servers if s["traceId"] == TRACE]
    assert traced["parentId"] == mine["id"]
    assert traced["name"] == "my-app.default.svc.cluster.local:80/*"
    # Traces that start at n2: the 3 plaintext requests, and the 10 sent to the `tcp-app` port
    # (relayed at L4 by n1, so no trace context; its target port is the pods' 8080, which the
    # `http` port also targets: the destination parses a pod port some Service declares HTTP).
    roots = [s for s in servers if "parentId" not in s]
    principals = Counter(s["tags"]["peer.principal"] for s in roots)
    assert principals == {"-": 3, "spiffe://cluster.local/ns/default/sa/client": 10}, roots
    for server in servers:
        assert server["localEndpoint"]["serviceName"] == "n2"
        if server in roots:
            continue
        parent = by_id.get(server["parentId"])
        assert parent is not None, f"SERVER span {server} has no CLIENT parent from n1"
        assert parent["traceId"] == server["traceId"]
        assert parent["localEndpoint"]["serviceName"] == "n1"
    assert len({s["traceId"] for s in servers}) == len(servers)
    print(f"sent={dict(sent)} client_spans={len(clients)} server_spans={len(servers)}"
          f" n2_tunnels={_sum(n2, 'istio_tcp_connections_opened_total', **dst):g}")  # fmt: skip
