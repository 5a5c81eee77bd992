"""In-process HTTP backends (h11 over any trio stream), connectors, and snapshots for tests."""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio
import trio.testing
from snapshot_docs import snapshot_of

from nodeagent.balance import Registry
from nodeagent.snapshot import Snapshot
from nodeagent.snapshot.model import Endpoint

_uids = itertools.count(1)


@dataclass
class Seen:
    """A request as the backend received it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    backend: str


Reply = tuple[int, list[tuple[str, str]], bytes]
Handler = Callable[[Seen], Awaitable[Reply]]


async def ok(seen: Seen) -> Reply:
    return 200, [("x-backend", seen.backend)], f"{seen.backend} {seen.target}".encode()


@dataclass
class Backend:
    """An HTTP/1.1 server (keep-alive) that records requests and answers with `handler`."""

    name: str
    handler: Handler = ok
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    upgrade_echo: bool = False  # answer an Upgrade request with 101, then echo raw bytes

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await _next(conn, stream)
                if not isinstance(req, h11.Request):
                    return
                body = b""
                while True:
                    ev = await _next(conn, stream)
                    if isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage) or ev is h11.PAUSED:
                        break
                    else:
                        return
                headers = {k.decode(): v.decode() for k, v in req.headers}
                seen = Seen(req.method.decode(), req.target.decode(), headers, body, self.name)
                self.seen.append(seen)
                if self.upgrade_echo and "upgrade" in headers:
                    await stream.send_all(
                        conn.send(
                            h11.InformationalResponse(
                                status_code=101,
                                headers=[
                                    ("connection", "upgrade"),
                                    ("upgrade", headers["upgrade"]),
                                ],
                            )
                        )
                        or b""
                    )
                    rest = conn.trailing_data[0]
                    if rest:
                        await stream.send_all(b"echo:" + rest)
                    while data := await stream.receive_some(65536):
                        await stream.send_all(b"echo:" + data)
                    return
                status, hdrs, payload = await self.handler(seen)
                if not any(k == "content-length" for k, _ in hdrs):
                    hdrs = [*hdrs, ("content-length", str(len(payload)))]
                await stream.send_all(
                    conn.send(h11.Response(status_code=status, headers=hdrs)) or b""
                )
                await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def _next(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        return ev


def memory_connector(
    nursery: trio.Nursery, backends: dict[str, Backend], fail: set[str] | None = None
) -> Callable[[Endpoint, int], Awaitable[trio.abc.Stream]]:
    """A connector giving in-memory streams to `backends` by endpoint address."""
    fail = fail if fail is not None else set()

    async def connect(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        if endpoint.address in fail or endpoint.address not in backends:
            raise OSError(111, f"connection refused: {endpoint.address}")
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(backends[endpoint.address].serve, b)
        return a

    return connect


class _FirstDraw(random.Random):
    """Every draw is the lowest: a RANDOM balancer takes the first candidate (and a retry that
    must avoid it, the second), ROUND_ROBIN starts there."""

    def random(self) -> float:
        return 0.0

    def randrange(self, *args: Any, **kw: Any) -> int:
        return 0


def first_endpoint_registry(**kw: Any) -> Registry:
    """A balance registry whose RANDOM clusters pick the first endpoint (a retry: the next
    one), so a test knows which backend a request reaches; any balancer picks a one-endpoint
    cluster's endpoint."""
    return Registry(rng=_FirstDraw(), on_event=None, **kw)


def service(name: str, *, port: int = 80, target: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "targetPort": target}],
        },
    }


def workload(ip: str, labels: dict[str, str]) -> dict[str, Any]:
    uid = f"uid-{next(_uids):08d}"  # zero-padded: endpoint order follows creation order
    return {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {
            "name": f"pod-{uid}",
            "namespace": "default",
            "uid": uid,
            "labels": labels,
            "annotations": {},
        },
        "spec": {"node": "node-1", "addresses": [ip], "serviceAccount": "default"},
    }


def vs(name: str, http: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"hosts": [name], "http": http, **spec},
    }


def dr(host: str, *, lb: str | None = None, **subsets: dict[str, str]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "host": host,
        "subsets": [{"name": k, "labels": v} for k, v in subsets.items()],
    }
    if lb is not None:
        spec["trafficPolicy"] = {"loadBalancer": {"simple": lb}}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host},
        "spec": spec,
    }


def build(*docs: dict[str, Any]) -> Snapshot:
    return snapshot_of(docs)


def app_snapshot(*extra: dict[str, Any]) -> Snapshot:
    """Service `app` (port 80) with endpoints 10.0.0.1 (v1) and 10.0.0.2 (v2), + `extra`.
    Balanced RANDOM: with `first_endpoint_registry` a request goes to 10.0.0.1, a retry to
    10.0.0.2."""
    return build(
        service("app"),
        workload("10.0.0.1", {"app": "app", "version": "v1"}),
        workload("10.0.0.2", {"app": "app", "version": "v2"}),
        dr("app", lb="RANDOM", v1={"version": "v1"}, v2={"version": "v2"}),
        *extra,
    )


class RawClient:
    """A bytes-level HTTP client on a stream: send raw, read one h11 response."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = headers if headers is not None else [("host", "app")]
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs):
            hdrs = [*hdrs, ("content-length", str(len(body)))]
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
        )
        if body:
            await self.stream.send_all(self.conn.send(h11.Data(data=body)) or b"")
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        resp = await _next(self.conn, self.stream)
        while isinstance(resp, h11.InformationalResponse):
            resp = await _next(self.conn, self.stream)
        assert isinstance(resp, h11.Response), resp
        body = b""
        while True:
            ev = await _next(self.conn, self.stream)
            if isinstance(ev, h11.Data):
                body += ev.data
            else:
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return resp.status_code, {k.decode(): v.decode() for k, v in resp.headers}, body


async def start_tcp_backend(nursery: trio.Nursery, backend: Backend) -> int:
    """Serve `backend` on 127.0.0.1 (a free port, returned)."""
    listeners = await nursery.start(partial(trio.serve_tcp, backend.serve, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def tcp_connector(ports: dict[str, int]) -> Callable[[Endpoint, int], Awaitable[trio.abc.Stream]]:
    """A plain TCP connector: endpoint address → a backend on 127.0.0.1:<port>."""

    async def connect(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        if endpoint.address not in ports:
            raise OSError(111, f"no backend for {endpoint.address}")
        return await trio.open_tcp_stream("127.0.0.1", ports[endpoint.address])

    return connect


async def curl(*args: str, limit: float = 60) -> str:
    """Run the real curl; its stdout."""
    with trio.fail_after(limit):
        proc = await trio.run_process(
            ["curl", "-sS", "--max-time", str(limit), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if proc.returncode not in (0, 22, 28):
        raise AssertionError(f"curl {args} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout.decode()
