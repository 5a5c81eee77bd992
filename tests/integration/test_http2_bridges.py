"""HTTP/1.1 ↔ HTTP/2 translation and HTTP/2 at the ingress gateway, on a 2-node sandbox with
real clients and servers: `curl --http1.1` to `grpc`/`http2`-declared services whose servers
speak only HTTP/2 (grpcio, an h2c-only server) — translated at the source agent, trailers as
chunked trailers for `TE: trailers` (dropped without it: the loopback tests check that, grpcio
refuses a call without `TE: trailers`); `curl --http2-prior-knowledge` to an `http` service whose
server speaks only HTTP/1.1 (Python's http.server); `curl --http2` over TLS to the gateway (ALPN
h2 negotiated) and a grpcio client through the gateway over TLS. Metrics: `request_protocol` is
`http` for plain requests whichever the codec, `grpc` for gRPC calls.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from grpc_apps import write_apps
from l7_helpers import write_app
from mesh_helpers import apply, eventually, sandbox_fixture
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("hb", gateway="n1")
GRPC_VIP, H2_VIP, H1_VIP = "10.96.84.10", "10.96.84.11", "10.96.84.12"
EDGE = "edge.example.com"
PY = sys.executable  # the venv's Python: grpcio and nodeagent importable in the pods

# A grpcio client over TLS to the gateway: N unary calls on one channel.
TLS_CLIENT = r"""
import collections, json, sys
import grpc

target, host, ca, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
options = [("grpc.ssl_target_name_override", host), ("grpc.default_authority", host),
           ("grpc.enable_http_proxy", 0)]
channel = grpc.secure_channel(target, creds, options=options)
call = channel.unary_unary("/test.Echo/Unary", request_serializer=lambda b: b,
                           response_deserializer=lambda b: b)
answers, codes = collections.Counter(), collections.Counter()
for _ in range(n):
    try:
        answers[call(b"hi", timeout=30).decode()] += 1
        codes["OK"] += 1
    except grpc.RpcError as exc:
        codes[exc.code().name] += 1
print(json.dumps({"answers": answers, "codes": codes}))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("h2bridge")


@pytest.fixture(scope="module")
def deployed(sandbox: Sandbox, files: Path) -> dict[str, Any]:
    apps = write_apps(files)
    (files / "tls_client.py").write_text(TLS_CLIENT)
    # one gRPC message "x" (uncompressed, length 1), for curl
    (files / "grpc-msg.bin").write_bytes(b"\x00\x00\x00\x00\x01x")
    pods = {
        "client": sandbox.pod_add("n1", "default", "client", ["sleep", "3600"]),
        "grpc": sandbox.pod_add(
            "n2", "default", "grpc-1", [PY, str(apps["grpc_server"]), "grpc-1", "0"],
            labels={"app": "grpc-app"},
        ),
        "h2": sandbox.pod_add(
            "n2", "default", "h2-1", [PY, str(apps["h2_server"]), "h2-1"], labels={"app": "h2"}
        ),
        "h1": sandbox.pod_add("n2", "default", "h1-1", [*write_app(files), "h1"],
                              labels={"app": "h1"}),
    }  # fmt: skip
    ca = sandbox.gateway_cert(EDGE, "edge")
    gateway = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": "default"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                         "hosts": [EDGE], "tls": {"mode": "SIMPLE", "credentialName": "edge"}}],
        },
    }  # fmt: skip
    routes = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "edge", "namespace": "default"},
        "spec": {
            "hosts": [EDGE],
            "gateways": ["edge"],
            "http": [
                {"match": [{"uri": {"prefix": "/test.Echo/"}}],
                 "route": [{"destination": {"host": "grpc-app"}}]},
                {"route": [{"destination": {"host": "h1"}}]},
            ],
        },
    }  # fmt: skip
    # on the `http` service, gRPC methods routed to the `grpc` one (a route across protocols)
    across = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "h1", "namespace": "default"},
        "spec": {
            "hosts": ["h1"],
            "http": [
                {"match": [{"uri": {"prefix": "/test.Echo/"}}],
                 "route": [{"destination": {"host": "grpc-app"}}]},
                {"route": [{"destination": {"host": "h1"}}]},
            ],
        },
    }  # fmt: skip
    docs = [
        service("grpc-app", cluster_ip=GRPC_VIP, port_name="grpc"),
        service("h2", cluster_ip=H2_VIP, port_name="http2"),
        service("h1", cluster_ip=H1_VIP, port_name="http"),
        gateway,
        routes,
        across,
    ]
    apply(sandbox, files, "h2bridge", docs)
    gw_ip = sandbox.gateway_url().removeprefix("http://").rsplit(":", 1)[0]
    out = {"pods": pods, "ca": str(ca), "gw": gw_ip}
    c = pods["client"]
    eventually(lambda: "h2-1 /ready" in curl(sandbox, c, "--http1.1", f"http://{H2_VIP}/ready"),
               "h2 through the mesh", timeout=40)  # fmt: skip
    eventually(lambda: "path=/ready" in curl(sandbox, c, "--http1.1", f"http://{H1_VIP}/ready"),
               "h1 through the mesh", timeout=40)  # fmt: skip
    eventually(lambda: gateway_curl(sandbox, out, "/ready").endswith(" 200"), "the gateway",
               timeout=40)  # fmt: skip
    return out


def curl(sb: Sandbox, pod: Pod | str, *args: str) -> str:
    r = sb.exec(pod, ["curl", "-sS", "--max-time", "10", *args], timeout=30)
    return str(r.stdout)


def gateway_curl(sb: Sandbox, d: dict[str, Any], path: str, *args: str) -> str:
    """https://edge.example.com<path> from the outside host; ends " <http_version> <code>"."""
    return curl(
        sb, "outside", "--cacert", d["ca"], "--resolve", f"{EDGE}:443:{d['gw']}",
        "-w", " %{http_version} %{http_code}", *args, f"https://{EDGE}{path}",
    ).strip()  # fmt: skip


def requests_of(sb: Sandbox, node: str, service_host: str) -> list[Any]:
    url = f"http://{sb.node(node).underlay_ip}:15020/stats/prometheus"
    r = sb.exec("outside", ["curl", "-sf", "--max-time", "5", url], timeout=15)
    fqdn = f"{service_host}.default.svc.cluster.local"
    return [
        s
        for s in samples(str(r.stdout), "istio_requests_total")
        if s.labels.get("destination_service") == fqdn and s.labels["reporter"] == "source"
    ]


def test_curl_http1_to_an_http2_service_reaches_an_h2_only_server(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    c = deployed["pods"]["client"]
    out = curl(sandbox, c, "-i", "--http1.1", f"http://{H2_VIP}/one")
    assert out.startswith("HTTP/1.1 200 OK"), out
    assert out.rstrip().endswith("h2-1 /one"), out
    # h2load as an HTTP/1.1 client: 200 requests over 2 keep-alive connections
    load = sandbox.exec(c, ["h2load", "--h1", "-n", "200", "-c", "2", f"http://{H2_VIP}/load"])
    assert "200 succeeded" in str(load.stdout), load.stdout
    assert "200 2xx" in str(load.stdout), load.stdout

    def counted() -> float:
        return sum(s.value for s in requests_of(sandbox, "n1", "h2"))

    eventually(lambda: counted() >= 201, "h2 requests counted")
    got = requests_of(sandbox, "n1", "h2")
    assert {(s.labels["request_protocol"], s.labels["response_code"]) for s in got} == {
        ("http", "200")
    }


def test_curl_http1_grpc_call_to_grpcio_gets_its_trailers_as_chunked_trailers(
    sandbox: Sandbox, deployed: dict[str, Any], files: Path
) -> None:
    c = deployed["pods"]["client"]
    grpc = ["-i", "--http1.1", "-H", "content-type: application/grpc",
            "--data-binary", f"@{files / 'grpc-msg.bin'}"]  # fmt: skip
    url = f"http://{GRPC_VIP}/test.Echo/Unary"
    with_te = curl(sandbox, c, *grpc, "-H", "te: trailers", url)
    assert with_te.startswith("HTTP/1.1 200"), with_te
    assert "transfer-encoding: chunked" in with_te.lower(), with_te
    # the grpcio server's answer message (length-prefixed), then its trailers, chunked
    assert "\x00\x00\x00\x00\x06grpc-1grpc-status: 0\n" in with_te, with_te
    eventually(
        lambda: sum(s.value for s in requests_of(sandbox, "n1", "grpc-app")) >= 1,
        "grpc-app calls counted",
    )
    got = requests_of(sandbox, "n1", "grpc-app")
    assert {s.labels["request_protocol"] for s in got} == {"grpc"}
    assert {s.labels["grpc_response_status"] for s in got} == {"0"}


def test_curl_http2_prior_knowledge_to_an_http_service_reaches_an_http1_server(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    c = deployed["pods"]["client"]
    out = curl(sandbox, c, "-i", "--http2-prior-knowledge", f"http://{H1_VIP}/two")
    assert out.startswith("HTTP/2 200"), out
    assert "version=h1 path=/two" in out, out
    assert "content-length:" in out.lower(), out  # the HTTP/1.1 server's length, passed on
    eventually(lambda: bool(requests_of(sandbox, "n1", "h1")), "h1 requests counted")
    assert {s.labels["request_protocol"] for s in requests_of(sandbox, "n1", "h1")} == {"http"}


def test_curl_http2_over_tls_to_the_gateway_negotiates_h2(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    h2 = gateway_curl(sandbox, deployed, "/three", "--http2")
    assert h2.endswith(" 2 200"), h2  # ALPN h2, then HTTP/1.1 to the `http` backend
    assert "version=h1 path=/three" in h2, h2
    h1 = gateway_curl(sandbox, deployed, "/four", "--http1.1")
    assert h1.endswith(" 1.1 200"), h1


def test_a_grpcio_client_through_the_gateway_over_tls(
    sandbox: Sandbox, deployed: dict[str, Any], files: Path
) -> None:
    r = sandbox.exec(
        "outside",
        [PY, str(files / "tls_client.py"), f"{deployed['gw']}:443", EDGE, deployed["ca"], "20"],
        timeout=120,
    )
    lines = [x for x in str(r.stdout).splitlines() if x.startswith("{")]
    assert lines, (r.stdout, r.stderr)
    assert json.loads(lines[-1]) == {"answers": {"grpc-1": 20}, "codes": {"OK": 20}}

    def gateway_grpc() -> list[Any]:
        return [
            s for s in requests_of(sandbox, "n1", "grpc-app")
            if "gateway" in s.labels.get("source_workload", "")
        ]  # fmt: skip

    eventually(lambda: sum(s.value for s in gateway_grpc()) >= 20, "the gateway's gRPC calls")
    assert {(s.labels["request_protocol"], s.labels["grpc_response_status"])
            for s in gateway_grpc()} == {("grpc", "0")}  # fmt: skip


def test_http1_grpc_calls_routed_to_a_grpc_port_go_upstream_as_h2(
    sandbox: Sandbox, deployed: dict[str, Any], files: Path
) -> None:
    """An HTTP/1.1 client whose request is routed to an HTTP/2 port (from the `http` service,
    and at the gateway): the HTTP/1.1 proxy hands it to the HTTP/2 proxy; grpcio answers."""
    grpc = ["-i", "--http1.1", "-H", "content-type: application/grpc", "-H", "te: trailers",
            "--data-binary", f"@{files / 'grpc-msg.bin'}"]  # fmt: skip
    answer = "\x00\x00\x00\x00\x06grpc-1grpc-status: 0\n"
    mesh = curl(sandbox, deployed["pods"]["client"], *grpc, f"http://{H1_VIP}/test.Echo/Unary")
    assert mesh.startswith("HTTP/1.1 200 OK"), mesh
    assert answer in mesh, mesh
    edge = gateway_curl(sandbox, deployed, "/test.Echo/Unary", *grpc)
    assert edge.startswith("HTTP/1.1 200 OK"), edge
    assert answer in edge, edge
    assert edge.endswith(" 1.1 200"), edge
