"""Loopback measurement of `HttpProxy` alone (not a test: `python tests/http/measure_http.py`).

wrk -t1 -c16 → `HttpProxy` (its own process, one trio thread, plain TCP both sides, the default
route to one endpoint) → `nodeagent.bench.server`. Prints requests/s and the proxy process's CPU
per 1000 requests (from /proc). How docs/l7.md "Performance" compares two versions of the proxy:
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proxy_main(listen: int, upstream: int) -> None:
    """The proxy process: default route for `app` to 10.0.0.1, connected to 127.0.0.1:upstream."""
    import trio
    from http_helpers import app_snapshot

    from nodeagent.http import HttpProxy
    from nodeagent.log import configure
    from nodeagent.routing import Source
    from nodeagent.snapshot.model import Endpoint

    configure("info")
    snapshot = app_snapshot()

    async def connect(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", upstream)

    async def main() -> None:
        proxy = HttpProxy(
            snapshot=lambda: snapshot,
            source=Source(namespace="default", labels={"app": "client"}),
            connector=connect,
            picker=lambda dest, endpoints: endpoints[0],
            access_logged=True,  # as in the agent: the access log writes the request's line
        )

        async def handler(stream: trio.SocketStream) -> None:
            await proxy.serve(stream, port=80, host="app.default.svc.cluster.local")

        await trio.serve_tcp(handler, listen, host="127.0.0.1")

    trio.run(main)


def measure(duration: float) -> None:
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
        [sys.executable, __file__, "--proxy", str(listen), str(server_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, str(HERE)])},
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
    args = parser.parse_args()
    if args.proxy:
        proxy_main(*args.proxy)
    else:
        measure(args.duration)
