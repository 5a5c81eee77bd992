"""HTTP/2 at the ingress gateway, on loopback: ALPN `h2` on its TLS servers (the real curl
`--http2`, and this package's HTTP/2 client over TLS), h2c prior knowledge on its plain port,
each request through the same routing and guard as HTTP/1.1, its upstream in the codec the
destination port declares (an `http` backend gets HTTP/1.1, a `grpc` one HTTP/2)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from h2_helpers import H2Backend
from h2_helpers import service as h2_service
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
from nodeagent.http.guard import RequestFacts, Verdict
from nodeagent.http.log import RequestLog
from nodeagent.http2.conn import H2Connection
from nodeagent.sandbox.certs import FileCa

HOST = "a.example.com"


def snapshot() -> Any:
    gateway = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "Gateway",
        "metadata": {"name": "gw", "namespace": "default"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [
                {"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                 "hosts": [HOST], "tls": {"mode": "SIMPLE", "credentialName": "a"}},
                {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
            ],
        },
    }  # fmt: skip
    routes = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "gw-routes", "namespace": "default"},
        "spec": {
            "hosts": [HOST],
            "gateways": ["gw"],
            "http": [
                {"match": [{"uri": {"prefix": "/pkg."}}],
                 "route": [{"destination": {"host": "grpc-app"}}]},
                {"route": [{"destination": {"host": "my-app"}}]},
            ],
        },
    }  # fmt: skip
    return build(
        service("my-app", port=80, target=8080),
        workload("10.0.0.1", {"app": "my-app"}),
        h2_service("grpc-app", port_name="grpc"),
        workload("10.0.0.2", {"app": "grpc-app"}),
        gateway,
        routes,
    )


async def guard(facts: RequestFacts) -> Verdict:
    """Refuses /denied; strips `authorization`, adds `x-claim` to what it lets through."""
    if facts.target.startswith("/denied"):
        return Verdict(False, 403, b"RBAC: access denied", details="rbac_access_denied")
    stripped = frozenset({"authorization"})
    return Verdict(True, remove_headers=stripped, add_headers=(("x-claim", "j"),))


@dataclass
class Gw:
    gateway: IngressGateway
    http1: Backend
    h2: H2Backend
    logs: list[RequestLog]
    ca_file: str

    @property
    def tls_port(self) -> int:
        return self.gateway.listening()[443]

    @property
    def plain_port(self) -> int:
        return self.gateway.listening()[80]


@pytest.fixture
def creds(tmp_path: Path) -> tuple[Path, str]:
    ca = FileCa(tmp_path / "ca")
    ca.issue(tmp_path / "credentials" / "a", HOST)
    return tmp_path / "credentials", str(ca.cert_file)


@asynccontextmanager
async def running(creds: tuple[Path, str]) -> AsyncIterator[Gw]:
    http1, h2 = Backend("v1"), H2Backend("grpc")
    logs: list[RequestLog] = []
    async with trio.open_nursery() as nursery:
        h2_listeners = await nursery.start(partial(trio.serve_tcp, h2.serve, 0, host="127.0.0.1"))
        ports = {
            "10.0.0.1": await start_tcp_backend(nursery, http1),
            "10.0.0.2": h2_listeners[0].socket.getsockname()[1],
        }
        snap = snapshot()
        gw = IngressGateway(
            snapshot=lambda: snap,
            wait_change=trio.sleep_forever,
            connector=tcp_connector(ports),
            bind_host="127.0.0.1",
            port_map=lambda port: 0,
            registry=first_endpoint_registry(),
            credentials=CredentialSource(creds[0]),
            on_request=logs.append,
            guard=guard,
        )
        await nursery.start(gw.run)
        try:
            yield Gw(gw, http1, h2, logs, creds[1])
        finally:
            nursery.cancel_scope.cancel()


async def settled() -> None:
    """Until the gateway finished its requests (a client may read the answer's last byte
    before the gateway wrote the request's record)."""
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)


async def curl(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(30):
        proc = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", *args],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def curl_tls(gw: Gw, path: str, *args: str) -> tuple[int, str, str]:
    """https://a.example.com<path> on the gateway; stdout ends with " <http_version> <code>"."""
    return await curl(
        "--cacert", gw.ca_file, "--resolve", f"{HOST}:{gw.tls_port}:127.0.0.1",
        "-w", " %{http_version} %{http_code}", *args, f"https://{HOST}:{gw.tls_port}{path}",
    )  # fmt: skip


async def test_curl_http2_negotiates_h2_and_reaches_an_http1_backend(
    creds: tuple[Path, str],
) -> None:
    async with running(creds) as gw:
        rc, out, err = await curl_tls(gw, "/x", "--http2", "-H", "authorization: Bearer t")
        rc1, out1, err1 = await curl_tls(gw, "/y", "--http1.1")
        await settled()
    assert (rc, out) == (0, "v1 /x 2 200"), err  # ALPN h2 negotiated, HTTP/1.1 upstream
    assert (rc1, out1) == (0, "v1 /y 1.1 200"), err1  # an HTTP/1.1 client is still served
    seen = gw.http1.seen[0].headers
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-claim"] == "j"  # the guard's header changes apply to HTTP/2 requests
    assert "authorization" not in seen
    assert [(e.code, e.protocol) for e in gw.logs] == [(200, "http"), (200, "http")]
    assert gw.gateway.statistics()["http2"]["connections"] == 1


async def test_the_guard_refuses_an_http2_request(creds: tuple[Path, str]) -> None:
    async with running(creds) as gw:
        rc, out, err = await curl_tls(gw, "/denied", "--http2")
        await settled()
    assert (rc, out) == (0, "RBAC: access denied 2 403"), err
    assert gw.http1.seen == []
    assert "UAEX" in gw.logs[-1].flags


async def test_grpc_over_tls_reaches_an_h2_backend_with_its_trailers(
    creds: tuple[Path, str],
) -> None:
    context = ssl.create_default_context(cafile=creds[1])
    context.set_alpn_protocols(["h2"])
    async with running(creds) as gw:
        raw = await trio.open_tcp_stream("127.0.0.1", gw.tls_port)
        tls = trio.SSLStream(raw, context, server_hostname=HOST)
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == "h2"
        conn = H2Connection(tls, client=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            stream = conn.open_stream(
                [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", HOST.encode()),
                 (b":path", b"/pkg.Svc/Call"), (b"content-type", b"application/grpc"),
                 (b"te", b"trailers")]
            )  # fmt: skip
            await stream.send_data(b"\0\0\0\0\0", end_stream=True)
            head = dict(await stream.wait_headers())
            body = b""
            while chunk := await stream.receive_data():
                body += chunk
            trailers = dict(stream.trailers or [])
            stream.close()
            nursery.cancel_scope.cancel()
        await settled()
    assert head[b":status"] == b"200"
    assert head[b"x-backend"] == b"grpc"
    assert body == b"\0\0\0\0\0"
    assert trailers[b"grpc-status"] == b"0"
    assert gw.h2.seen[0]["x-claim"] == "j"
    assert gw.h2.seen[0]["x-forwarded-proto"] == "https"
    assert (gw.logs[-1].protocol, gw.logs[-1].grpc_status) == ("grpc", 0)


async def test_h2c_prior_knowledge_on_the_plain_port(creds: tuple[Path, str]) -> None:
    async with running(creds) as gw:
        url = f"http://{HOST}:{gw.plain_port}/pkg.Svc/Other"
        rc, out, err = await curl(
            "--http2-prior-knowledge", "--resolve", f"{HOST}:{gw.plain_port}:127.0.0.1",
            "-w", " %{http_version} %{http_code}", url,
        )  # fmt: skip
        plain_rc, plain, _ = await curl(
            "--resolve", f"{HOST}:{gw.plain_port}:127.0.0.1", "-w", " %{http_version}",
            f"http://{HOST}:{gw.plain_port}/z",
        )  # fmt: skip
    assert (rc, out) == (0, "grpc /pkg.Svc/Other 2 200"), err
    assert gw.h2.seen[0][":scheme"] == "http"
    assert (plain_rc, plain) == (0, "v1 /z 1.1")


async def test_the_gateway_prefers_h2_to_http1(creds: tuple[Path, str]) -> None:
    """A client offering both (http/1.1 first) gets h2: the server's order decides."""
    context = ssl.create_default_context(cafile=creds[1])
    context.set_alpn_protocols(["http/1.1", "h2"])
    async with running(creds) as gw:
        tls = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", gw.tls_port), context, server_hostname=HOST
        )
        await tls.do_handshake()
        chosen = tls.selected_alpn_protocol()
        await tls.aclose()
    assert chosen == "h2"


async def test_an_http1_clients_request_to_a_grpc_service_goes_upstream_as_h2(
    creds: tuple[Path, str],
) -> None:
    """The HTTP/1.1 proxy hands a request routed to an HTTP/2 port to the HTTP/2 proxy: the
    backend speaks only HTTP/2; the answer comes back as HTTP/1.1, trailers for TE: trailers."""
    async with running(creds) as gw:
        rc, out, err = await curl_tls(gw, "/pkg.Svc/Get", "--http1.1", "-i", "-H", "te: trailers")
        rc2, out2, err2 = await curl_tls(gw, "/pkg.Svc/Get2", "--http1.1")
        await settled()
    assert rc == 0, err
    assert out.startswith("HTTP/1.1 200 OK"), out
    assert "grpc /pkg.Svc/Getgrpc-status: 0" in out.replace("\r\n", "\n"), out
    assert out.endswith(" 1.1 200"), out
    assert (rc2, out2) == (0, "grpc /pkg.Svc/Get2 1.1 200"), err2  # trailers dropped
    seen = gw.h2.seen[0]
    assert (seen[":authority"], seen["x-claim"], seen["x-forwarded-proto"]) == (
        f"{HOST}:{gw.tls_port}", "j", "https"
    )  # fmt: skip
    assert [e.code for e in gw.logs] == [200, 200]
