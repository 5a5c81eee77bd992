"""TLS origination in a sandbox: a meshed pod calls http://…external.example/ and its agent
speaks TLS to HTTPS servers on the outside host (ServiceEntry + DestinationRule `tls`).

The outside host runs two Python HTTPS servers with edge-CA certificates for
`api.external.example`: 8443, and 9443 requiring a client certificate of that CA. The outside
host is given a route back to n1's pods (a real cluster's egress NAT does that job). Checked:
SIMPLE with the right CA → 200, with the wrong CA → 503 UF and the transport failure reason in
the body and in the agent's log line; MUTUAL with the client certificate the server requires.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from mesh_helpers import apply, eventually, sandbox_fixture
from tls_helpers import TLS_SERVER

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.sandbox.certs import FileCa

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("orig")

API = "api.external.example"
OUTSIDE = "10.200.0.100"


def entry(name: str, vip: str, target: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "hosts": [f"{name}.external.example"],
            "addresses": [vip],
            "location": "MESH_EXTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": target}],
            "endpoints": [{"address": OUTSIDE}],
        },
    }


def rule(name: str, tls: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"host": f"{name}.external.example", "trafficPolicy": {"tls": tls}},
    }


@pytest.fixture(scope="module")
def setup(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    files = tmp_path_factory.mktemp("origination")
    ca, wrong = FileCa(files / "ca"), FileCa(files / "wrong-ca")
    ca.issue(files / "server", API, [API])
    ca.issue(files / "client", "client.example.com")
    (files / "tls_server.py").write_text(TLS_SERVER)
    # The way back from the outside host to n1's pods (the sandbox leaves it out on purpose).
    outside = sandbox.netns_of("outside")
    subprocess.run(
        ["ip", "-n", outside, "route", "add", "10.201.1.0/24", "via", "10.200.0.11"], check=True
    )
    script, cert = str(files / "tls_server.py"), str(files / "server")
    servers = [
        sandbox.popen(
            "outside", ["python3", script, cert, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for args in (["8443"], ["9443", str(ca.cert_file)])
    ]  # fmt: skip
    client = sandbox.pod_add("n1", "default", "app", ["sleep", "3600"], service_account="app")
    client_dir = files / "client"
    apply(
        sandbox,
        files,
        "external",
        [
            entry("api", "240.240.0.10", 8443),
            entry("wrong", "240.240.0.11", 8443),
            entry("mtls", "240.240.0.12", 9443),
            rule("api", {"mode": "SIMPLE", "caCertificates": str(ca.cert_file)}),
            rule("wrong", {"mode": "SIMPLE", "caCertificates": str(wrong.cert_file), "sni": API}),
            rule(
                "mtls",
                {
                    "mode": "MUTUAL",
                    "caCertificates": str(ca.cert_file),
                    "sni": API,
                    "clientCertificate": str(client_dir / "tls.crt"),
                    "privateKey": str(client_dir / "tls.key"),
                },
            ),
        ],
    )
    try:
        yield {"client": client}
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=10)


def call(sb: Sandbox, pod: Pod, name: str, vip: str, path: str = "/") -> str:
    """ "body status" of the app's plain-HTTP request to http://<name>.external.example/."""
    host = f"{name}.external.example"
    r = sb.exec(
        pod,
        ["curl", "-sS", "--max-time", "5", "-w", " %{http_code}",
         "--resolve", f"{host}:80:{vip}", f"http://{host}{path}"],
        timeout=20,
    )  # fmt: skip
    return str(r.stdout).strip()


def test_simple_with_the_right_ca_answers_200(sandbox: Sandbox, setup: dict[str, Any]) -> None:
    pod = setup["client"]
    eventually(
        lambda: call(sandbox, pod, "api", "240.240.0.10", "/x") == "pod-tls /x 200",
        "TLS origination to the outside host",
    )


def test_simple_with_the_wrong_ca_is_503_with_the_reason_logged(
    sandbox: Sandbox, setup: dict[str, Any]
) -> None:
    pod = setup["client"]
    eventually(
        lambda: call(sandbox, pod, "wrong", "240.240.0.11").endswith(" 503"),
        "503 for a certificate the wrong CA cannot verify",
    )
    out = call(sandbox, pod, "wrong", "240.240.0.11")
    assert "transport failure reason: TLS_error:CERTIFICATE_VERIFY_FAILED" in out, out
    agent_log = sandbox.node("n1").paths.agent_log

    def logged() -> bool:
        # The access-log line of such a request: flag UF and the reason (written asynchronously).
        return any(
            '"response_flags": "UF' in line and "CERTIFICATE_VERIFY_FAILED" in line
            for line in agent_log.read_text().splitlines()
        )

    eventually(logged, "an access-log line with UF and the verification failure")


def test_mutual_presents_the_client_certificate_the_server_requires(
    sandbox: Sandbox, setup: dict[str, Any]
) -> None:
    pod = setup["client"]
    eventually(
        lambda: call(sandbox, pod, "mtls", "240.240.0.12", "/m") == "pod-tls /m 200",
        "MUTUAL origination",
    )
    # The same server refuses a client without a certificate (curl from the outside host).
    r = sandbox.exec(
        "outside",
        ["curl", "-sS", "--max-time", "5", "-k", f"https://{OUTSIDE}:9443/"],
        timeout=20,
    )  # fmt: skip
    assert r.returncode != 0
