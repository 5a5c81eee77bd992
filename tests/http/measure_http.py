"""Loopback measurement of `HttpProxy` alone (not a test: `python tests/http/measure_http.py`).

wrk -t1 -c16 → `HttpProxy` (its own process, one trio thread, plain TCP both sides, the default
route to one endpoint; `--route`: a `uri: prefix` VirtualService as `scripts/bench mesh` has;
`--telemetry`: metrics, tracer and access log (to /dev/null) as in the agent) →
`nodeagent.bench.server`. Prints requests/s and the proxy process's CPU
per 1000 requests (from /proc). `--destination`: the destination agent's `InboundHttp` instead
(no routing; the per-request guard over the snapshot's workload, no policy; with `--telemetry`
its reporter="destination" recording and a SERVER span). How docs/l7.md "Performance" compares
two versions of the proxy:
run it once per version (PYTHONPATH=<checkout>), back to back on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proxy_main(
    listen: int, upstream: int, *, route: bool, telemetry: bool, destination: bool = False
) -> None:
    """The proxy process: `app` routed to 10.0.0.1, connected to 127.0.0.1:upstream."""
    import trio
    from http_helpers import app_snapshot, first_endpoint_registry, vs

    from nodeagent.http import HttpProxy, RequestLog
    from nodeagent.log import configure
    from nodeagent.routing import Source
    from nodeagent.snapshot.model import Endpoint
    from nodeagent.telemetry.accesslog import AccessLog
    from nodeagent.telemetry.dataplane import record_request
    from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry
    from nodeagent.telemetry.tracing import Tracer

    configure("info")
    rules = [{"match": [{"uri": {"prefix": "/"}}], "route": [{"destination": {"host": "app"}}]}]
    snapshot = app_snapshot(vs("app", rules)) if route else app_snapshot()

    class Sinks:
        def __init__(self) -> None:
            self.metrics = IstioMetrics(MetricsRegistry())
            self.access_log = AccessLog(sink=open(os.devnull, "w"))  # noqa: SIM115
            self.tracer = Tracer("bench", sample_rate=0.01)

    sinks = Sinks()
    if destination:
        destination_main(listen, upstream, snapshot, sinks, telemetry)
        return

    def on_request(entry: RequestLog) -> None:
        record_request(sinks, snapshot, entry, source=None, namespace="default")

    async def connect(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", upstream)

    async def main() -> None:
        proxy = HttpProxy(
            snapshot=lambda: snapshot,
            source=Source(namespace="default", labels={"app": "client"}),
            connector=connect,
            registry=first_endpoint_registry(),
            access_logged=True,  # as in the agent: the access log writes the request's line
            on_request=on_request if telemetry else None,
            tracer=sinks.tracer if telemetry else None,
        )

        async def handler(stream: trio.SocketStream) -> None:
            await proxy.serve(stream, port=80, host="app.default.svc.cluster.local")

        async with trio.open_nursery() as nursery:
            if telemetry:
                await nursery.start(sinks.access_log.run)
            await nursery.start(partial(trio.serve_tcp, handler, listen, host="127.0.0.1"))

    trio.run(main)


def destination_main(
    listen: int, upstream: int, snapshot: Any, sinks: Any, telemetry: bool
) -> None:
    """`InboundHttp` as the destination agent runs it for workload 10.0.0.1's HTTP port."""
    import trio

    from nodeagent.authn import Authenticator
    from nodeagent.http import RequestLog
    from nodeagent.http.inbound import InboundConnection, InboundHttp
    from nodeagent.proxy.l7_guard import workload_guard
    from nodeagent.telemetry.dataplane import record_inbound_request

    me = snapshot.workload_by_ip("10.0.0.1")
    server = InboundHttp(
        guard=workload_guard(lambda: snapshot, lambda s: me, Authenticator()),
        tracer=sinks.tracer if telemetry else None,
        access_logged=True,
    )

    def on_request(entry: RequestLog) -> None:
        record_inbound_request(sinks, entry, source=None, destination=me, service=None,
                               source_principal="spiffe://cluster.local/ns/default/sa/client",
                               security_policy="mutual_tls")  # fmt: skip

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", upstream)

    async def handler(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        inbound = InboundConnection(
            source_ip=peer[0], source_port=peer[1], destination_ip="10.0.0.1", port=8080,
            source_identity="spiffe://cluster.local/ns/default/sa/client", connect=connect,
            on_request=on_request if telemetry else None, xfcc="By=x;Hash=y;Subject=\"\";URI=z",
        )  # fmt: skip
        await server.serve(stream, inbound)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if telemetry:
                await nursery.start(sinks.access_log.run)
            await nursery.start(partial(trio.serve_tcp, handler, listen, host="127.0.0.1"))

    trio.run(main)


def measure(duration: float, extra: list[str]) -> None:
    server_port, listen = _free_port(), _free_port()
    ports = [str(_free_port()) for _ in range(2)]
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "nodeagent.bench.server", "--host", "127.0.0.1"),
            *("--http", str(server_port), "--echo", ports[0], "--bulk", ports[1]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        [sys.executable, __file__, "--proxy", str(listen), str(server_port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, str(HERE), str(HERE.parent)])},
    )
    try:
        url = f"http://127.0.0.1:{listen}/"
        deadline = time.monotonic() + 10
        while True:  # bounded: until the proxy accepts
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        subprocess.run(["wrk", "-t1", "-c16", "-d1s", url], capture_output=True, check=True)
        before = _cpu_s(proxy.pid)
        out = subprocess.run(
            ["wrk", "-t1", "-c16", f"-d{duration:g}s", url],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 30,
        ).stdout
        cpu = _cpu_s(proxy.pid) - before
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        rate = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
        errors = "Non-2xx" in out or "Socket errors" in out
        print(
            f"{rate:,.0f} req/s, proxy CPU {cpu / requests * 1e6:.0f} ms per 1000 requests"
            f"{', ERRORS: ' + out if errors else ''}"
        )
    finally:
        for p in (proxy, server):
            p.terminate()
            p.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--proxy", nargs=2, type=int, metavar=("LISTEN", "UPSTREAM"))
    parser.add_argument("--route", action="store_true", help="a uri-prefix VirtualService")
    parser.add_argument("--telemetry", action="store_true", help="metrics, tracer, access log")
    parser.add_argument("--destination", action="store_true", help="the destination's server")
    args = parser.parse_args()
    if args.proxy:
        proxy_main(
            *args.proxy, route=args.route, telemetry=args.telemetry, destination=args.destination
        )
    else:
        flags = ["--route"] * args.route + ["--telemetry"] * args.telemetry
        flags += ["--destination"] * args.destination
        measure(args.duration, flags)
