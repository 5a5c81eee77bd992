"""TLS origination on loopback: DestinationRule `tls` SIMPLE/MUTUAL to a real TLS backend.

The app side is plain HTTP (the real curl to the proxy); the backend terminates TLS with a
certificate of the sandbox edge CA and records the SNI it was asked for. Checked: the right CA
→ 200 with the service host (or `sni`) as SNI; the wrong CA → 503 UF, the transport failure
reason in the body and the request log; insecureSkipVerify only when asked; subjectAltNames;
MUTUAL presents the client certificate a backend requires; pooled plain and TLS connections to
one endpoint are not mixed.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from http_helpers import (
    Backend,
    Handler,
    Reply,
    Seen,
    build,
    curl,
    first_endpoint_registry,
    ok,
    service,
    workload,
)

from nodeagent.http import HttpProxy, RequestLog
from nodeagent.routing import Source
from nodeagent.sandbox.certs import FileCa
from nodeagent.snapshot import Snapshot

HOST = "api.default.svc.cluster.local"


def snapshot(tls: dict[str, Any] | None, *extra: dict[str, Any]) -> Snapshot:
    rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "api"},
        "spec": {"host": "api", **({"trafficPolicy": {"tls": tls}} if tls else {})},
    }
    return build(
        service("api", port=80, target=8443), workload("10.0.0.1", {"app": "api"}), rule, *extra
    )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca, wrong = FileCa(tmp_path / "ca"), FileCa(tmp_path / "wrong")
    ca.issue(tmp_path / "server", HOST, [HOST, "api.example.com"])
    ca.issue(tmp_path / "client", "client.example.com")
    return {"ca": str(ca.cert_file), "wrong": str(wrong.cert_file), "dir": tmp_path}


@asynccontextmanager
async def running(
    pki: dict[str, Any],
    holder: list[Snapshot],
    *,
    require_client: bool = False,
    handler: Handler = ok,
) -> AsyncIterator[tuple[str, list[RequestLog], list[str | None]]]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki["dir"] / "server" / "tls.crt", pki["dir"] / "server" / "tls.key")
    if require_client:
        server.load_verify_locations(pki["ca"])
        server.verify_mode = ssl.CERT_REQUIRED
    snis: list[str | None] = []
    server.sni_callback = lambda sock, name, ctx: snis.append(name)  # type: ignore[assignment]
    backend = Backend("api", handler)

    async def serve_tls(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, server, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            await raw.aclose()
            return
        await backend.serve(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_tls, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]

        async def connect(endpoint: Any, service_port: int) -> trio.abc.Stream:
            return await trio.open_tcp_stream("127.0.0.1", port)

        logs: list[RequestLog] = []
        proxy = HttpProxy(
            snapshot=lambda: holder[0],
            source=Source(namespace="default", labels={"app": "client"}),
            connector=connect,
            on_request=logs.append,
            registry=first_endpoint_registry(),
        )

        async def handle(stream: trio.SocketStream) -> None:
            await proxy.serve(stream, port=80, host=HOST, client_address="127.0.0.1")

        front = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        try:
            yield f"http://127.0.0.1:{front[0].socket.getsockname()[1]}", logs, snis
        finally:
            nursery.cancel_scope.cancel()
            await proxy.aclose()


async def status(url: str) -> str:
    return await curl("-w", " %{http_code}", url)


async def test_simple_with_the_right_ca_then_the_wrong_one(pki: dict[str, Any]) -> None:
    holder = [snapshot({"mode": "SIMPLE", "caCertificates": pki["ca"]})]
    async with running(pki, holder) as (url, logs, snis):
        assert await status(f"{url}/x") == "api /x 200"
        assert await status(f"{url}/y") == "api /y 200"  # the pooled TLS connection
        assert snis == [HOST]
        holder[0] = snapshot({"mode": "SIMPLE", "caCertificates": pki["wrong"]})
        out = await status(f"{url}/z")
        assert out.endswith(" 503"), out
        assert "transport failure reason: TLS_error:CERTIFICATE_VERIFY_FAILED" in out
        last = logs[-1]
        assert last.flags[0] == "UF"
        assert "CERTIFICATE_VERIFY_FAILED" in last.upstream_transport_failure_reason


async def test_sni_subject_alt_names_and_insecure_skip_verify(pki: dict[str, Any]) -> None:
    holder = [snapshot({"mode": "SIMPLE", "caCertificates": pki["ca"], "sni": "api.example.com"})]
    async with running(pki, holder) as (url, logs, snis):
        assert await status(f"{url}/") == "api / 200"
        assert snis == ["api.example.com"]
        holder[0] = snapshot(
            {"mode": "SIMPLE", "caCertificates": pki["ca"], "subjectAltNames": ["other.org"]}
        )
        out = await status(f"{url}/")
        assert out.endswith(" 503"), out
        assert "subjectAltNames" in logs[-1].upstream_transport_failure_reason
        holder[0] = snapshot({"mode": "SIMPLE", "insecureSkipVerify": True})  # no CA at all
        assert await status(f"{url}/") == "api / 200"


async def test_plain_and_tls_connections_to_one_endpoint_are_not_mixed(
    pki: dict[str, Any],
) -> None:
    holder = [snapshot({"mode": "SIMPLE", "caCertificates": pki["ca"]})]
    async with running(pki, holder) as (url, _, snis):
        assert await status(f"{url}/a") == "api /a 200"
        holder[0] = snapshot(None)  # no origination: plain HTTP to a TLS port fails
        out = await status(f"{url}/b")
        assert not out.endswith(" 200"), out
        holder[0] = snapshot({"mode": "SIMPLE", "caCertificates": pki["ca"]})
        assert await status(f"{url}/c") == "api /c 200"
        assert len(snis) == 1  # the idle TLS connection was reused, never handed to plain


async def test_mutual_presents_the_client_certificate(pki: dict[str, Any]) -> None:
    client = pki["dir"] / "client"
    holder = [
        snapshot(
            {
                "mode": "MUTUAL",
                "caCertificates": pki["ca"],
                "clientCertificate": str(client / "tls.crt"),
                "privateKey": str(client / "tls.key"),
            }
        )
    ]
    async with running(pki, holder, require_client=True) as (url, _, _):
        assert await status(f"{url}/m") == "api /m 200"
        holder[0] = snapshot({"mode": "SIMPLE", "caCertificates": pki["ca"]})
        out = await status(f"{url}/n")  # no client certificate: the backend refuses
        assert not out.endswith(" 200"), out


async def test_a_mirrored_copy_is_originated_too(pki: dict[str, Any]) -> None:
    mirror_vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "api"},
        "spec": {
            "hosts": ["api"],
            "http": [{"route": [{"destination": {"host": "api"}}], "mirror": {"host": "api"}}],
        },
    }
    holder = [snapshot({"mode": "SIMPLE", "caCertificates": pki["ca"]}, mirror_vs)]
    both = trio.Event()
    targets: list[str] = []

    async def counting(seen: Seen) -> Reply:
        targets.append(seen.target)
        if len(targets) == 2:
            both.set()
        return await ok(seen)

    async with running(pki, holder, handler=counting) as (url, _, snis):
        assert await status(f"{url}/copy") == "api /copy 200"
        with trio.fail_after(10):
            await both.wait()
    assert targets == ["/copy", "/copy"]
    assert len(snis) == 2  # the copy on a fresh TLS connection, never in plaintext
