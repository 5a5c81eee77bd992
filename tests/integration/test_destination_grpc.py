"""The destination agent enforces L7 policy on gRPC: on a 2-node sandbox, real grpcio servers on
n2 behind Services whose ports are named `grpc`, real grpcio clients in pods on n1 with the
service accounts `sleep` and `admin`, a JWKS server pod and tokens signed in the test.

n2's agent terminates each HTTP/2 connection that comes out of the tunnel (`http2/inbound.py`),
authenticates and authorizes every call by its method (`/test.Echo/Unary`), answers refusals as
gRPC errors (PERMISSION_DENIED, UNAUTHENTICATED) and counts reporter="destination" metrics
with the call's grpc-status; allowed calls, streaming ones included, reach the app intact.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from destination_helpers import ISSUER, Issuer, access_lines, ap, op, scrape
from grpc_apps import PY, client, unary, write_apps
from mesh_helpers import admin, apply, eventually, http, sandbox_fixture
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("dg")

ECHO_VIP, SECURE_VIP, H2_VIP = (f"10.96.86.{i}" for i in (10, 11, 13))
ADMIN = "cluster.local/ns/client/sa/admin"
SLEEP = "cluster.local/ns/client/sa/sleep"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("destination_grpc")


@pytest.fixture(scope="module")
def issuer(files: Path) -> Issuer:
    d = files / "jwks"
    d.mkdir()
    issuer = Issuer(d / "jwks.json")
    issuer.publish(k1=issuer.new_key("k1"))
    return issuer


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path, issuer: Issuer) -> dict[str, Pod]:
    apps = write_apps(files)

    def grpc_server(name: str) -> Pod:
        cmd = [PY, str(apps["grpc_server"]), name, "0"]
        return sandbox.pod_add("n2", "shop", name, cmd, service_account=name, labels={"app": name})

    def client_pod(sa: str) -> Pod:
        return sandbox.pod_add("n1", "client", sa, ["sleep", "3600"], service_account=sa)

    out = {
        "sleep": client_pod("sleep"),
        "admin": client_pod("admin"),
        "outsider": sandbox.pod_add(
            "n1", "client", "outsider", ["sleep", "3600"],
            labels={"istio.io/dataplane-mode": "none"},
        ),
        "echo": grpc_server("dg-echo"),
        "secure": grpc_server("dg-secure"),
        # A plain HTTP app (h2c) behind a port declared HTTP/2.
        "h2": sandbox.pod_add(
            "n2", "shop", "h2", [PY, str(apps["h2_server"]), "h2"], labels={"app": "h2"}
        ),
        "jwks": sandbox.pod_add(
            "n2", "shop", "jwks",
            ["python3", "-m", "http.server", "8000", "--directory", str(issuer.file.parent)],
            labels={"istio.io/dataplane-mode": "none"},
        ),
    }  # fmt: skip
    echo, secure = {"app": "dg-echo"}, {"app": "dg-secure"}
    jwks_uri = f"http://{out['jwks'].ip}:8000/jwks.json"
    docs: list[dict[str, Any]] = [
        service("dg-echo", echo, namespace="shop", cluster_ip=ECHO_VIP, port_name="grpc"),
        service("dg-secure", secure, namespace="shop", cluster_ip=SECURE_VIP, port_name="grpc"),
        service("h2", namespace="shop", cluster_ip=H2_VIP, port_name="http2"),
        ap("h2-open", "shop", "ALLOW", [op(paths=["/open/*"])], {"app": "h2"}),
        # One method for admin, the streaming ones for sleep: the method is the :path.
        ap(
            "unary-for-admin",
            "shop",
            "ALLOW",
            [{"from": [{"source": {"principals": [ADMIN]}}], **op(paths=["/test.Echo/Unary"])}],
            echo,
        ),
        ap(
            "streams-for-sleep",
            "shop",
            "ALLOW",
            [
                {
                    "from": [{"source": {"principals": [SLEEP]}}],
                    **op(methods=["POST"], paths=["/test.Echo/Stream", "/test.Echo/Bidi"]),
                }
            ],
            echo,
        ),
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "secure-jwt", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": secure},
                "jwtRules": [{"issuer": ISSUER, "jwksUri": jwks_uri, "audiences": ["api"]}],
            },
        },
        ap(
            "secure-needs-a-token",
            "shop",
            "ALLOW",
            [{"from": [{"source": {"requestPrincipals": ["*"]}}]}],
            secure,
        ),
    ]
    apply(sandbox, files, "destination-grpc", docs)
    eventually(
        lambda: calls(sandbox, out["admin"], files, ECHO_VIP, 1) == {"OK": 1},
        "admin's unary call to dg-echo",
        timeout=40,
    )
    eventually(
        lambda: calls(sandbox, out["sleep"], files, ECHO_VIP, 1) == {"PERMISSION_DENIED": 1},
        "n2 enforces dg-echo's policies on gRPC",
    )
    return out


def calls(sb: Sandbox, pod: Pod, files: Path, vip: str, n: int, *extra: str) -> dict[str, int]:
    """The status codes of `n` unary calls (one channel)."""
    got: dict[str, int] = unary(sb, pod, files, vip, n, *extra)["codes"]
    return got


def grpc_requests(text: str, service_host: str) -> Counter[tuple[str, str, str]]:
    """n2's reporter="destination" request counts for `service_host`, by (grpc-status,
    source principal, request_protocol)."""
    fqdn = f"{service_host}.shop.svc.cluster.local"
    out: Counter[tuple[str, str, str]] = Counter()
    for s in samples(text, "istio_requests_total"):
        labels = s.labels
        if labels.get("reporter") == "destination" and labels["destination_service"] == fqdn:
            key = (labels["grpc_response_status"], labels["source_principal"])
            out[(*key, labels["request_protocol"])] += int(s.value)
    return out


def test_one_grpc_method_for_one_identity(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    assert calls(sandbox, pods["admin"], files, ECHO_VIP, 5) == {"OK": 5}
    assert calls(sandbox, pods["sleep"], files, ECHO_VIP, 5) == {"PERMISSION_DENIED": 5}
    # sleep's streaming methods are allowed; admin's are not (another method, same service)
    assert client(sandbox, pods["sleep"], files, f"{ECHO_VIP}:80", "stream", "3")["count"] == 3
    refused = sandbox.exec(
        pods["admin"], [PY, str(files / "grpc_client.py"), f"{ECHO_VIP}:80", "stream", "3"]
    )
    assert "PERMISSION_DENIED" in str(refused.stdout) + str(refused.stderr)
    # The refusal is n2's, with Istio's details, logged as a gRPC request.
    denied = [
        line
        for line in access_lines(sandbox, "n2")
        if line.get("reporter") == "destination" and line.get("path") == "/test.Echo/Unary"
        and line.get("response_flags") == "UAEX"
    ]  # fmt: skip
    assert denied, "no destination access line for a refused call"
    assert denied[-1]["response_code_details"] == "rbac_access_denied_matched_policy[none]"
    assert denied[-1]["protocol"] == "grpc"
    assert denied[-1]["source_principal"] == f"spiffe://{SLEEP}"


def test_request_authentication_on_a_grpc_service(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path, issuer: Issuer
) -> None:
    sleep = pods["sleep"]

    def with_token(token: str) -> dict[str, int]:
        return calls(sandbox, sleep, files, SECURE_VIP, 2, "Unary", f"authorization=Bearer {token}")

    # No token: authentication lets it pass, the policy wants a request principal (Istio: 403,
    # PERMISSION_DENIED); a token that does not verify is refused by authentication (401).
    assert calls(sandbox, sleep, files, SECURE_VIP, 2) == {"PERMISSION_DENIED": 2}
    assert with_token(issuer.token("k1", key=issuer.new_key("k1"))) == {"UNAUTHENTICATED": 2}
    assert with_token(issuer.token("k1", exp_in=-120)) == {"UNAUTHENTICATED": 2}
    assert with_token("not.a.jwt") == {"UNAUTHENTICATED": 2}
    assert with_token(issuer.token("k1")) == {"OK": 2}


def test_a_plaintext_grpc_client_is_checked_per_call_on_15006(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path, issuer: Issuer
) -> None:
    # Outside the mesh, straight to the pods (PERMISSIVE): no principal, so dg-echo's methods
    # are refused; dg-secure wants only a verified token, which works without mTLS.
    outsider = pods["outsider"]

    def direct(pod: str, *extra: str) -> dict[str, int]:
        got = client(sandbox, outsider, files, f"{pods[pod].ip}:8080", "unary", "2", *extra)
        codes: dict[str, int] = got["codes"]
        return codes

    assert direct("echo", "Unary") == {"PERMISSION_DENIED": 2}
    assert direct("secure", "Unary") == {"PERMISSION_DENIED": 2}
    token = f"authorization=Bearer {issuer.token('k1')}"
    assert direct("secure", "Unary", token) == {"OK": 2}


def test_plain_http_clients_of_an_http2_port_are_checked_per_request(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    sleep = pods["sleep"]
    # HTTP/1.1 (no prior knowledge): the source agent speaks HTTP/2 upstream, as the port is
    # declared (Envoy's rule), so the destination's HTTP/2 server checks it.
    status, body, _ = http(sandbox, sleep, f"http://{H2_VIP}/open/a")
    assert (status, body) == (200, "h2 /open/a\n"), body
    assert http(sandbox, sleep, f"http://{H2_VIP}/closed")[:2] == (403, "RBAC: access denied")

    # h2c prior knowledge, not gRPC: the HTTP/2 server answers a refusal as HTTP/1.1 would.
    def h2c(path: str) -> tuple[str, str]:
        argv = ["curl", "--http2-prior-knowledge", "-s", "-m", "5", "-w", "\n%{http_code}"]
        body, _, code = str(
            sandbox.exec(sleep, [*argv, f"http://{H2_VIP}{path}"]).stdout
        ).rpartition("\n")
        return code, body

    assert h2c("/open/b") == ("200", "h2 /open/b\n")
    assert h2c("/closed") == ("403", "RBAC: access denied")


def test_destination_metrics_count_grpc_statuses(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    def pod_counts() -> tuple[int, int]:
        row = next(p for p in admin(sandbox, "n2", "/pods") if p["name"] == "dg-echo")
        inbound = row["connections"]["inbound"]
        return inbound["http_requests"], inbound["http_refused"]

    before = grpc_requests(scrape(sandbox, "n2"), "dg-echo")
    requests_before, refused_before = pod_counts()
    assert calls(sandbox, pods["admin"], files, ECHO_VIP, 3) == {"OK": 3}
    assert calls(sandbox, pods["sleep"], files, ECHO_VIP, 4) == {"PERMISSION_DENIED": 4}
    want = {
        ("0", f"spiffe://{ADMIN}", "grpc"): 3,
        ("7", f"spiffe://{SLEEP}", "grpc"): 4,
    }

    def delta() -> dict[tuple[str, str, str], int]:
        after = grpc_requests(scrape(sandbox, "n2"), "dg-echo")
        return {k: v for k, v in (after - before).items() if v}

    eventually(lambda: delta() == want, f"n2 counts {want}")
    requests, refused = pod_counts()  # the agent's own counters (admin /pods)
    assert (requests - requests_before, refused - refused_before) == (7, 4)


def test_streaming_calls_through_the_destination_server(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    sleep = pods["sleep"]
    got = client(sandbox, sleep, files, f"{ECHO_VIP}:80", "stream", "2000")
    assert got == {"count": 2000, "ordered": True}
    got = client(sandbox, sleep, files, f"{ECHO_VIP}:80", "bidi", "16")
    assert got == {"sent": 16 * 1024 * 1024, "same": True}
