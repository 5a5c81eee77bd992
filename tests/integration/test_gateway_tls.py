"""HTTPS at the ingress gateway of a sandbox, driven from the outside host with curl and openssl.

n1's agent runs the gateway with `--gateway-credentials` (the sandbox's credentials directory,
laid out as Kubernetes mounts TLS Secrets); certificates come from the sandbox's edge CA
(`Sandbox.gateway_cert`). The seed canary's VirtualService and DestinationRule are applied
unchanged behind a Gateway whose servers are HTTPS (and HTTP with httpsRedirect). Checked: the
right certificate per SNI, verification fails without the CA, Host outside the SNI server gets
404, httpsRedirect 301, MUTUAL refuses no client certificate and one from another CA,
rotation without restart, PASSTHROUGH to a pod terminating TLS itself, no private key byte in
the admin socket, metrics or log, and the seed A/B test unchanged behind HTTPS.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from l7_helpers import SEED, write_app
from mesh_helpers import admin, apply, apply_file, eventually, sandbox_fixture, wait_config
from snapshot_docs import service
from tls_helpers import TLS_SERVER, cn, served_certificate

from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.certs import FileCa

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("gwtls", gateway="n1")

HOST, OTHER, MTLS = "my-app.example.com", "other.example.com", "mtls.example.com"
PASS = "pass.example.com"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-tls")


def https_gateway() -> dict[str, Any]:
    """The seed's `http-gateway`, its servers made HTTPS (the VirtualService names it)."""

    def server(number: int, name: str, host: str, **tls: Any) -> dict[str, Any]:
        return {
            "port": {"number": number, "name": name, "protocol": "HTTPS"},
            "hosts": [host],
            "tls": tls,
        }

    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "http-gateway", "namespace": "default"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [
                {
                    "port": {"number": 80, "name": "http", "protocol": "HTTP"},
                    "hosts": [HOST],
                    "tls": {"httpsRedirect": True},
                },
                server(443, "https-my-app", HOST, mode="SIMPLE", credentialName="my-app"),
                server(443, "https-other", OTHER, mode="SIMPLE", credentialName="other"),
                server(8443, "https-mtls", MTLS, mode="MUTUAL", credentialName="mtls"),
                {
                    "port": {"number": 443, "name": "tls-pass", "protocol": "TLS"},
                    "hosts": [PASS],
                    "tls": {"mode": "PASSTHROUGH"},
                },
            ],
        },
    }


@pytest.fixture(scope="module")
def deployed(sandbox: Sandbox, files: Path) -> dict[str, Any]:
    app = write_app(files)
    pods = {
        "v1": sandbox.pod_add(
            "n1", "default", "my-app-v1", [*app, "v1.0.0"],
            service_account="my-app", labels={"app": "my-app", "version": "v1.0.0"},
        ),
        "v2": sandbox.pod_add(
            "n2", "default", "my-app-v2", [*app, "v2.0.0"],
            service_account="my-app", labels={"app": "my-app", "version": "v2.0.0"},
        ),
    }  # fmt: skip
    (files / "tls_server.py").write_text(TLS_SERVER)
    FileCa(sandbox.state_dir / "edge-ca").issue(files / "pod-cert", "pod-tls.example.com", [PASS])
    pods["pass"] = sandbox.pod_add(
        "n2", "default", "pass-v1",
        ["python3", str(files / "tls_server.py"), str(files / "pod-cert"), "8443"],
        service_account="pass", labels={"app": "pass"},
    )  # fmt: skip
    ca_file = sandbox.gateway_cert(HOST, "my-app")
    sandbox.gateway_cert(OTHER, "other")
    sandbox.gateway_cert(MTLS, "mtls")  # its ca.crt (the edge CA) verifies clients
    client = files / "client"
    FileCa(sandbox.state_dir / "edge-ca").issue(client, "client.example.com")
    FileCa(files / "stranger-ca").issue(files / "stranger", "client.example.com")
    seed = [d for d in yaml.safe_load_all((SEED / "01-canary.yaml").read_text()) if d]
    routes = [d for d in seed if d["kind"] != "Gateway"]  # the VirtualService and DR, unchanged
    passthrough = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "pass", "namespace": "default"},
        "spec": {
            "hosts": [PASS],
            "gateways": ["http-gateway"],
            "tls": [
                {
                    "match": [{"sniHosts": [PASS]}],
                    "route": [{"destination": {"host": "pass", "port": {"number": 443}}}],
                }
            ],
        },
    }
    docs = [
        service("my-app"),
        service("pass", port=443, target=8443, port_name="tls"),
        https_gateway(),
        *routes,
        passthrough,
    ]
    apply(sandbox, files, "https", docs)
    gw_ip = sandbox.gateway_url().removeprefix("http://").rsplit(":", 1)[0]
    out = {"pods": pods, "ca": str(ca_file), "ip": gw_ip, "client": client, "files": files}
    eventually(lambda: curl(sandbox, out, HOST, "/my-app/x")[1].endswith(" 200"), "HTTPS route")
    return out


def curl(
    sb: Sandbox,
    d: dict[str, Any],
    host: str,
    path: str,
    *args: str,
    port: int = 443,
    ca: bool = True,
) -> tuple[int, str]:
    """(curl's exit code, "body status") of https://host:port/path from the outside host."""
    argv = [
        "curl", "-sS", "--max-time", "5", "-w", " %{http_code}",
        "--resolve", f"{host}:{port}:{d['ip']}", *(["--cacert", d["ca"]] if ca else []),
        *args, f"https://{host}:{port}{path}",
    ]  # fmt: skip
    r = sb.exec("outside", argv, timeout=20)
    return r.returncode, str(r.stdout).strip()


def test_https_serves_the_seed_canary_with_the_sni_certificate(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    versions = set()
    for _ in range(60):
        rc, out = curl(sandbox, deployed, HOST, "/my-app/x")
        assert rc == 0, out
        assert out.endswith(" 200"), out
        assert "path=/x " in out, out  # the canary's rewrite
        versions.add(out.split("version=")[1].split()[0])
    assert versions <= {"v1.0.0", "v2.0.0"}
    assert "v1.0.0" in versions
    assert cn(served_certificate(sandbox, deployed["ip"], HOST)) == HOST
    assert cn(served_certificate(sandbox, deployed["ip"], OTHER)) == OTHER
    assert served_certificate(sandbox, deployed["ip"], "unknown.example.com") is None
    rc, out = curl(sandbox, deployed, HOST, "/my-app/x", ca=False)
    assert rc == 60, out  # the client cannot verify the gateway without the CA


def test_a_host_other_than_the_sni_server_gets_404(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    rc, out = curl(sandbox, deployed, HOST, "/my-app/x", "-H", f"Host: {OTHER}")
    assert (rc, out) == (0, "404")


def test_http_server_with_https_redirect_answers_301(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    r = sandbox.exec(
        "outside",
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
         "-H", f"Host: {HOST}", f"http://{deployed['ip']}/my-app/x"],
        timeout=20,
    )  # fmt: skip
    assert str(r.stdout) == f"301 https://{HOST}/my-app/x"


def test_mutual_requires_a_client_certificate_of_the_ca(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    client, stranger = deployed["client"], deployed["files"] / "stranger"
    mine = ("--cert", str(client / "tls.crt"), "--key", str(client / "tls.key"))
    theirs = ("--cert", str(stranger / "tls.crt"), "--key", str(stranger / "tls.key"))
    rc, out = curl(sandbox, deployed, MTLS, "/my-app/", *mine, port=8443)
    assert rc == 0, out
    assert out.endswith(" 200"), out
    rc, out = curl(sandbox, deployed, MTLS, "/my-app/", port=8443)
    assert rc != 0, out
    rc, out = curl(sandbox, deployed, MTLS, "/my-app/", *theirs, port=8443)
    assert rc != 0, out


def test_a_rotated_certificate_is_served_without_restart(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    pid = sandbox.node("n1").agent_pid
    before = served_certificate(sandbox, deployed["ip"], HOST)
    assert before is not None
    sandbox.gateway_cert(HOST, "my-app")
    new = x509.load_pem_x509_certificate(
        (sandbox.gateway_credentials_dir / "my-app" / "tls.crt").read_bytes()
    )
    assert new.serial_number != before.serial_number
    deadline = time.monotonic() + 15
    while True:
        seen = served_certificate(sandbox, deployed["ip"], HOST)
        if seen is not None and seen.serial_number == new.serial_number:
            break
        assert time.monotonic() < deadline, "the rotated certificate was not served in 15 s"
        time.sleep(0.5)
    rc, out = curl(sandbox, deployed, HOST, "/my-app/x")
    assert rc == 0, out
    assert out.endswith(" 200"), out
    assert sandbox.node("n1").agent_pid == pid  # no restart


def test_private_keys_appear_in_no_dump_metric_or_log(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    keys = [
        (sandbox.gateway_credentials_dir / name / "tls.key").read_text().splitlines()[1]
        for name in ("my-app", "other", "mtls")
    ]
    dumped = admin(sandbox, "n1", "/config_dump")
    assert dumped["gateway"]["credentials"]["my-app"]["mode"] == "SIMPLE"  # by name only
    dump = repr(dumped)
    metrics = str(
        sandbox.exec(
            "node/n1", ["curl", "-sS", "http://127.0.0.1:15020/stats/prometheus"], timeout=20
        ).stdout
    )
    assert "istio_requests_total" in metrics
    log = sandbox.node("n1").paths.agent_log.read_text()
    assert "credential.loaded" in log
    for key in keys:
        for where, text in (("config_dump", dump), ("metrics", metrics)):
            assert key not in text, f"a private key line is in {where}"
        assert key not in log, "a private key line is in the agent log"


def test_passthrough_reaches_a_pod_that_terminates_tls_itself(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    eventually(
        lambda: curl(sandbox, deployed, PASS, "/hello")[1] == "pod-tls /hello 200",
        "the passthrough route to the pod",
    )
    ip = deployed["ip"]
    assert cn(served_certificate(sandbox, ip, PASS)) == "pod-tls.example.com"  # the pod's own
    assert cn(served_certificate(sandbox, ip, HOST)) == HOST  # same port, the gateway's
    log = sandbox.node("n1").paths.agent_log.read_text()
    assert "gateway.passthrough" in log


def test_the_seed_ab_test_works_unchanged_behind_https(
    sandbox: Sandbox, deployed: dict[str, Any]
) -> None:
    apply_file(sandbox, SEED / "03-ab-user-agent.yaml")  # replaces the canary's my-app VS
    gateway = sandbox.state().gateway
    assert gateway is not None
    # Not the answers alone: under the canary's weights Firefox gets v2 one time in ten.
    wait_config(sandbox, gateway)
    chrome = ("-A", "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36")
    firefox = ("-A", "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0")
    eventually(
        lambda: (
            "version=v1.0.0" in curl(sandbox, deployed, HOST, "/my-app", *chrome)[1]
            and "version=v2.0.0" in curl(sandbox, deployed, HOST, "/my-app", *firefox)[1]
        ),
        "the A/B routes over HTTPS",
    )
    for _ in range(5):
        assert "version=v1.0.0" in curl(sandbox, deployed, HOST, "/my-app", *chrome)[1]
        assert "version=v2.0.0" in curl(sandbox, deployed, HOST, "/my-app", *firefox)[1]
    rc, out = curl(sandbox, deployed, HOST, "/my-app", "-A", "curl/8")
    assert (rc, out) == (0, "404")
