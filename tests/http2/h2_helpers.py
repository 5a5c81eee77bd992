"""In-process HTTP/2 backends (on `nodeagent.http2.conn`), snapshots and a proxy on loopback."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from snapshot_docs import snapshot_of

from nodeagent.balance import Registry
from nodeagent.http.log import RequestLog
from nodeagent.http2.conn import H2Connection, H2Stream
from nodeagent.http2.proxy import H2Proxy
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot
from nodeagent.snapshot.model import Endpoint

_uids = itertools.count(1)
HOST = "app.default.svc.cluster.local"

Handler = Callable[["H2Backend", H2Stream, dict[str, str], bytes], Awaitable[None]]


async def echo(backend: H2Backend, stream: H2Stream, headers: dict[str, str], body: bytes) -> None:
    """200 with the request body back and `x-backend`; `x-grpc-status` → trailers-only gRPC."""
    if "x-grpc-status" in headers:
        stream.send_headers(
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", headers["x-grpc-status"].encode()),
                (b"x-backend", backend.name.encode()),
            ],
            end_stream=True,
        )
        return
    if "x-sleep" in headers:
        await trio.sleep(float(headers["x-sleep"]))
    stream.send_headers([(b":status", b"200"), (b"x-backend", backend.name.encode())])
    await stream.send_data(body or f"{backend.name} {headers[':path']}".encode())
    stream.send_trailers([(b"grpc-status", b"0"), (b"x-trailer", b"yes")])


@dataclass
class H2Backend:
    name: str
    handler: Handler = echo
    seen: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0

    async def serve(self, transport: trio.abc.Stream) -> None:
        self.connections += 1
        conn = H2Connection(transport, client=False)
        await conn.run(self._stream)

    async def _stream(self, stream: H2Stream) -> None:
        assert stream.headers is not None
        headers = {k.decode(): v.decode() for k, v in stream.headers}
        self.seen.append(headers)
        body = b""
        if "x-stream" not in headers:
            while chunk := await stream.receive_data():
                body += chunk
        await self.handler(self, stream, headers, body)


def service(name: str, *, port_name: str = "grpc", port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": port_name, "port": port, "targetPort": 8080}],
        },
    }


def workload(ip: str, labels: dict[str, str]) -> dict[str, Any]:
    uid = f"uid-{next(_uids)}"
    return {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": f"pod-{uid}", "namespace": "default", "uid": uid, "labels": labels},
        "spec": {"node": "node-1", "addresses": [ip], "serviceAccount": "default"},
    }


def vs(http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "app", "namespace": "default"},
        "spec": {"hosts": ["app"], "http": http},
    }


def dr(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "app", "namespace": "default"},
        "spec": {"host": "app", **spec},
    }


def app_snapshot(*extra: dict[str, Any], replicas: int = 3) -> Snapshot:
    """Service `app` (a `grpc` port 80) with endpoints 10.0.0.1.. (version v1, v2, …)."""
    docs: list[dict[str, Any]] = [service("app")]
    for i in range(1, replicas + 1):
        docs.append(workload(f"10.0.0.{i}", {"app": "app", "version": f"v{i}"}))
    return snapshot_of([*docs, *extra])


def tcp_connector(ports: dict[str, int]) -> Callable[[Endpoint, int], Awaitable[trio.abc.Stream]]:
    async def connect(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        if endpoint.address not in ports:
            raise OSError(111, f"connection refused: {endpoint.address}")
        return await trio.open_tcp_stream("127.0.0.1", ports[endpoint.address])

    return connect


@dataclass
class Running:
    port: int  # the proxy's listening port on 127.0.0.1
    proxy: H2Proxy
    backends: dict[str, H2Backend]
    logs: list[RequestLog]


@asynccontextmanager
async def running(
    snapshot: Snapshot, backends: list[H2Backend], **proxy_kw: Any
) -> AsyncIterator[Running]:
    """Backends on loopback as 10.0.0.1.. in order, an H2Proxy in front of them."""
    logs: list[RequestLog] = []
    async with trio.open_nursery() as nursery:
        ports: dict[str, int] = {}
        by_ip: dict[str, H2Backend] = {}
        for i, backend in enumerate(backends, 1):
            listeners = await nursery.start(
                partial(trio.serve_tcp, backend.serve, 0, host="127.0.0.1")
            )
            ports[f"10.0.0.{i}"] = listeners[0].socket.getsockname()[1]
            by_ip[f"10.0.0.{i}"] = backend
        proxy = H2Proxy(
            snapshot=lambda: snapshot,
            source=Source(namespace="default"),
            connector=tcp_connector(ports),
            registry=proxy_kw.pop("registry", None) or Registry(on_event=None),
            on_request=logs.append,
            **proxy_kw,
        )
        await nursery.start(proxy.run)

        async def serve(stream: trio.SocketStream) -> None:
            await proxy.serve(stream, port=80, host=HOST, client_address="127.0.0.1")

        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield Running(listeners[0].socket.getsockname()[1], proxy, by_ip, logs)
        nursery.cancel_scope.cancel()


async def curl_h2(
    port: int, path: str = "/", *args: str, limit: float = 30
) -> tuple[int, str, str]:
    """The real curl with --http2-prior-knowledge: (exit code, stdout, stderr)."""
    with trio.fail_after(limit):
        proc = await trio.run_process(
            [
                "curl",
                "-sS",
                "--http2-prior-knowledge",
                "--max-time",
                str(limit),
                *args,
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
