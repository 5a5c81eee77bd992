"""The gateway's TLS servers on loopback: real certificates, real curl and openssl s_client.

Checked: SIMPLE by credentialName, the certificate chosen by SNI, a Host that is not the SNI
server's gets 404, an unknown SNI is refused, verification fails without the CA; MUTUAL refuses
no client certificate, one of another CA, and one whose SAN is not allowed; httpsRedirect gives
301; protocol versions and cipher suites; a rotated certificate is served without a restart,
a half-written rotation keeps the old one; no key byte in the statistics.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from http_helpers import (
    Backend,
    build,
    first_endpoint_registry,
    service,
    start_tcp_backend,
    tcp_connector,
    workload,
)

from nodeagent.gateway import CredentialSource, IngressGateway
from nodeagent.sandbox.certs import FileCa
from nodeagent.snapshot import Snapshot

HOSTS = ("a.example.com", "b.example.com")


def gateway_doc(servers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "Gateway",
        "metadata": {"name": "tls-gw", "namespace": "default"},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": servers},
    }


def https(name: str, hosts: list[str], **tls: Any) -> dict[str, Any]:
    return {
        "port": {"number": 443, "name": name, "protocol": "HTTPS"},
        "hosts": hosts,
        "tls": tls,
    }


def routes(*hosts: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "app", "namespace": "default"},
        "spec": {
            "hosts": list(hosts),
            "gateways": ["tls-gw"],
            "http": [{"route": [{"destination": {"host": "my-app"}}]}],
        },
    }


def mesh(*docs: dict[str, Any]) -> Snapshot:
    return build(
        service("my-app", port=80, target=8080),
        workload("10.0.0.1", {"app": "my-app"}),
        *docs,
    )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca, other = FileCa(tmp_path / "ca"), FileCa(tmp_path / "other-ca")
    creds = tmp_path / "credentials"
    for host in HOSTS:
        ca.issue(creds / host.split(".")[0], host)
    (creds / "a" / "ca.crt").unlink()  # MUTUAL's CA, in the `<name>-cacert` Secret instead
    (creds / "a-cacert").mkdir()
    (creds / "a-cacert" / "ca.crt").write_bytes(ca.pem())
    ca.issue(tmp_path / "client", "client.example.com")
    other.issue(tmp_path / "stranger", "client.example.com")
    return {
        "ca": ca,
        "ca_file": str(ca.cert_file),
        "creds": creds,
        "client": tmp_path / "client",
        "stranger": tmp_path / "stranger",
    }


async def start_tls_backend(nursery: trio.Nursery, cert_dir: Path) -> int:
    """A backend that terminates TLS itself (its own certificate) and answers "pod-tls"."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_dir / "tls.crt", cert_dir / "tls.key")

    async def serve(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            got = b""
            while b"\r\n\r\n" not in got:
                data = await stream.receive_some(4096)
                if not data:
                    return
                got += data
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\npod-tls"
            )
            await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


@asynccontextmanager
async def gateway(
    snap: Snapshot, creds: Path, pod_cert: Path | None = None, backend: Backend | None = None
) -> AsyncIterator[IngressGateway]:
    async with trio.open_nursery() as nursery:
        ports = {"10.0.0.1": await start_tcp_backend(nursery, backend or Backend("v1"))}
        if pod_cert is not None:
            ports["10.0.0.2"] = await start_tls_backend(nursery, pod_cert)
        gw = IngressGateway(
            snapshot=lambda: snap,
            wait_change=trio.sleep_forever,
            connector=tcp_connector(ports),
            bind_host="127.0.0.1",
            port_map=lambda port: 0,
            registry=first_endpoint_registry(),
            credentials=CredentialSource(creds, recheck=0.2),
        )
        await nursery.start(gw.run)
        try:
            yield gw
        finally:
            nursery.cancel_scope.cancel()


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    with trio.fail_after(30):
        proc = await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def curl(port: int, host: str, *args: str, path: str = "/") -> tuple[int, str, str]:
    """(curl's exit code, "status body", stderr) of https://host:port/ resolved to loopback."""
    return await run(
        "curl", "-sS", "--max-time", "10", "-w", " %{http_code}",
        "--resolve", f"{host}:{port}:127.0.0.1", *args, f"https://{host}:{port}{path}",
    )  # fmt: skip


async def served_certificate(port: int, sni: str, *args: str) -> x509.Certificate | None:
    """The certificate `openssl s_client -servername sni` sees (None: the handshake failed)."""
    _, out, _ = await run(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", sni, *args,
        stdin=b"",
    )  # fmt: skip
    if "-----BEGIN CERTIFICATE-----" not in out:
        return None
    pem = out[out.index("-----BEGIN CERTIFICATE-----") : out.index("-----END CERTIFICATE-----")]
    return x509.load_pem_x509_certificate((pem + "-----END CERTIFICATE-----\n").encode())


def cn(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


async def test_simple_serves_each_sni_its_certificate_and_routes(pki: dict[str, Any]) -> None:
    snap = mesh(
        gateway_doc(
            [
                https("https-a", ["a.example.com"], mode="SIMPLE", credentialName="a"),
                https("https-b", ["b.example.com"], mode="SIMPLE", credentialName="b"),
            ]
        ),
        routes(*HOSTS),
    )
    backend = Backend("v1")
    async with gateway(snap, pki["creds"], backend=backend) as gw:
        port = gw.listening()[443]
        for host in HOSTS:
            rc, out, err = await curl(port, host, "--cacert", pki["ca_file"], path="/x")
            assert (rc, out) == (0, "v1 /x 200"), err
            assert cn(await served_certificate(port, host)) == host
        assert backend.seen[0].headers["x-forwarded-proto"] == "https"
        # No CA: the client cannot verify the gateway's certificate (curl 60).
        rc, _, err = await curl(port, "a.example.com")
        assert rc == 60, err
        # The connection-reuse trap: SNI a, Host b → 404 (the SNI's server has no host b).
        rc, out, _ = await curl(
            port, "a.example.com", "--cacert", pki["ca_file"], "-H", "Host: b.example.com"
        )
        assert (rc, out) == (0, " 404")
        # An SNI no server has: refused at the handshake.
        assert await served_certificate(port, "c.example.com") is None
        stats = gw.statistics()
        assert stats["tls_refused"] >= 2
        assert stats["credentials"]["a"]["loads"] == 1
    key = (pki["creds"] / "a" / "tls.key").read_text().splitlines()[1]
    assert key not in repr(stats)


async def test_mutual_requires_a_client_certificate_of_the_ca(pki: dict[str, Any]) -> None:
    client, stranger = pki["client"], pki["stranger"]
    snap = mesh(
        gateway_doc(
            [
                https("https-a", ["a.example.com"], mode="MUTUAL", credentialName="a"),
                https(
                    "https-b",
                    ["b.example.com"],
                    mode="MUTUAL",
                    serverCertificate=str(pki["creds"] / "b" / "tls.crt"),
                    privateKey=str(pki["creds"] / "b" / "tls.key"),
                    caCertificates=pki["ca_file"],
                    subjectAltNames=["someone-else.example.com"],
                ),
            ]
        ),
        routes(*HOSTS),
    )
    ca = ("--cacert", pki["ca_file"])
    mine = ("--cert", str(client / "tls.crt"), "--key", str(client / "tls.key"))
    theirs = ("--cert", str(stranger / "tls.crt"), "--key", str(stranger / "tls.key"))
    async with gateway(snap, pki["creds"]) as gw:
        port = gw.listening()[443]
        rc, out, err = await curl(port, "a.example.com", *ca, *mine)
        assert (rc, out) == (0, "v1 / 200"), err
        rc, out, _ = await curl(port, "a.example.com", *ca)
        assert rc != 0, out
        rc, out, _ = await curl(port, "a.example.com", *ca, *theirs)
        assert rc != 0, out
        # The CA signed it, but its SAN is not in subjectAltNames.
        rc, out, _ = await curl(port, "b.example.com", *ca, *mine)
        assert rc != 0, out
        assert gw.statistics()["tls_refused"] >= 3


async def test_https_redirect_answers_301(pki: dict[str, Any]) -> None:
    plain = {
        "port": {"number": 80, "name": "http", "protocol": "HTTP"},
        "hosts": ["a.example.com"],
        "tls": {"httpsRedirect": True},
    }
    snap = mesh(gateway_doc([plain]), routes("a.example.com"))
    async with gateway(snap, pki["creds"]) as gw:
        port = gw.listening()[80]
        rc, out, _ = await run(
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
            "-H", "Host: a.example.com", f"http://127.0.0.1:{port}/my/path?q=1",
        )  # fmt: skip
        assert (rc, out) == (0, "301 https://a.example.com/my/path?q=1")


async def test_protocol_versions_and_cipher_suites(pki: dict[str, Any]) -> None:
    server = https(
        "https-a",
        ["a.example.com"],
        mode="SIMPLE",
        credentialName="a",
        maxProtocolVersion="TLSV1_2",
        cipherSuites=["ECDHE-ECDSA-AES256-GCM-SHA384"],
    )
    snap = mesh(gateway_doc([server]), routes("a.example.com"))
    async with gateway(snap, pki["creds"]) as gw:
        port = gw.listening()[443]
        assert await served_certificate(port, "a.example.com", "-tls1_3") is None
        _, out, _ = await run(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}",
            "-servername", "a.example.com", "-tls1_2", stdin=b"",
        )  # fmt: skip
        assert "Cipher is ECDHE-ECDSA-AES256-GCM-SHA384" in out, out
        assert (
            await served_certificate(
                port, "a.example.com", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"
            )
            is None
        )


async def test_a_rotated_certificate_is_served_without_restart(pki: dict[str, Any]) -> None:
    server = https("https-a", ["a.example.com"], mode="SIMPLE", credentialName="a")
    snap = mesh(gateway_doc([server]), routes("a.example.com"))
    async with gateway(snap, pki["creds"]) as gw:
        port = gw.listening()[443]
        before = await served_certificate(port, "a.example.com")
        assert before is not None
        # Half a rotation: a new key beside the old certificate. The old pair stays served.
        (pki["creds"] / "a" / "tls.key").write_bytes((pki["creds"] / "b" / "tls.key").read_bytes())
        await trio.sleep(0.5)
        still = await served_certificate(port, "a.example.com")
        assert still is not None
        assert still.serial_number == before.serial_number
        new = pki["ca"].issue(pki["creds"] / "a", "a.example.com")
        deadline = time.monotonic() + 10
        while True:
            seen = await served_certificate(port, "a.example.com")
            if seen is not None and seen.serial_number == new.serial_number:
                break
            assert time.monotonic() < deadline, "the rotated certificate was never served"
            await trio.sleep(0.2)
        rc, out, err = await curl(port, "a.example.com", "--cacert", pki["ca_file"])
        assert (rc, out) == (0, "v1 / 200"), err
        assert gw.statistics()["credentials"]["a"]["loads"] == 2


async def test_passthrough_reaches_a_backend_terminating_tls_itself(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    pod_cert = tmp_path / "pod"
    pki["ca"].issue(pod_cert, "pod-tls.example.com", ["p.example.com"])
    passthrough = {
        "port": {"number": 443, "name": "tls-p", "protocol": "TLS"},
        "hosts": ["p.example.com"],
        "tls": {"mode": "PASSTHROUGH"},
    }
    tls_vs = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "hosts": ["p.example.com"],
            "gateways": ["tls-gw"],
            "tls": [
                {
                    "match": [{"sniHosts": ["p.example.com"]}],
                    "route": [{"destination": {"host": "pt", "port": {"number": 443}}}],
                }
            ],
        },
    }
    snap = mesh(
        service("pt", port=443, target=8443),
        workload("10.0.0.2", {"app": "pt"}),
        gateway_doc([https("https-a", ["a.example.com"], mode="SIMPLE", credentialName="a"),
                     passthrough]),
        routes("a.example.com"),
        tls_vs,
    )  # fmt: skip
    async with gateway(snap, pki["creds"], pod_cert) as gw:
        port = gw.listening()[443]
        # The backend's own certificate, not one of the gateway's.
        assert cn(await served_certificate(port, "p.example.com")) == "pod-tls.example.com"
        rc, out, err = await curl(port, "p.example.com", "--cacert", pki["ca_file"])
        assert (rc, out) == (0, "pod-tls 200"), err
        # The terminated server on the same port still answers with the gateway's certificate.
        assert cn(await served_certificate(port, "a.example.com")) == "a.example.com"
        assert gw.statistics()["passthrough"] >= 2


async def test_a_secret_volume_swap_rotates_the_certificate(pki: dict[str, Any]) -> None:
    """The kubelet's atomic writer: files are symlinks into `..data`, itself a symlink to a
    timestamped directory that a rotation replaces in one rename."""
    creds: Path = pki["creds"]
    volume = creds / "kube"
    volume.mkdir()

    def publish(generation: str) -> x509.Certificate:
        new = volume / f"..{generation}"
        cert = pki["ca"].issue(new, "a.example.com")
        tmp = volume / "..data_tmp"
        tmp.symlink_to(new.name)
        tmp.rename(volume / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (volume / name).is_symlink():
                (volume / name).symlink_to(f"..data/{name}")
        return cert

    first = publish("2026_01")
    server = https("https-a", ["a.example.com"], mode="SIMPLE", credentialName="kube")
    snap = mesh(gateway_doc([server]), routes("a.example.com"))
    async with gateway(snap, creds) as gw:
        port = gw.listening()[443]
        seen = await served_certificate(port, "a.example.com")
        assert seen is not None
        assert seen.serial_number == first.serial_number
        second = publish("2026_02")
        deadline = time.monotonic() + 10
        while True:
            seen = await served_certificate(port, "a.example.com")
            if seen is not None and seen.serial_number == second.serial_number:
                break
            assert time.monotonic() < deadline, "the swapped Secret volume was never served"
            await trio.sleep(0.2)
