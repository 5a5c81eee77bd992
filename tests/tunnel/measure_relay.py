"""Measure the relay's CPU cost on loopback (not a test): `python tests/tunnel/measure_relay.py`.

One child process plays both agents (plaintext → relay → HBONE: an HTTP/2 CONNECT stream over a
pooled TLS 1.3 connection → relay → plaintext), the parent plays the app: an echo server and a
client doing 64-byte round trips on one connection, then 1000 new connections in a row (one
round trip each), then a bulk transfer echoed back. The figures are the child's CPU (utime +
stime from /proc) per round trip, per connection and per MiB, for the fast relay path and the
generic one (`relay(..., fast=False)`), so a change to `nodeagent/proxy/relay.py` or
`nodeagent/tunnel/` can be compared on one machine under one load. Knobs (environment):
MEASURE_RR_ONLY=1 skips the bulk part; MEASURE_CHUNK=N sets the relay's buffer size;
MEASURE_NO_DRAIN=1 turns off the "wait first after a short read" rule (for A/B runs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))
from pki import LocalIdentityProvider, ThrowawayCA, spiffe

from nodeagent.proxy.relay import relay
from nodeagent.tunnel import ConnectRequest, HboneStream, TunnelPool, accept_hbone, detach

A, B = spiffe("a", "client"), spiffe("b", "server")
ROUND_TRIPS = 20000
CONNECTIONS = 1000
BULK = 256 * 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


async def child(echo_port: int, fast: bool) -> None:
    if os.environ.get("MEASURE_CHUNK"):  # A/B of the relay's buffer size
        from nodeagent.proxy import relay as relay_module

        relay_module.CHUNK = int(os.environ["MEASURE_CHUNK"])
    if os.environ.get("MEASURE_NO_DRAIN"):  # A/B of the "wait first after a short read" rule
        from nodeagent.sockio import HboneEnd, SockEnd

        SockEnd.drained = lambda self, n, size: False  # type: ignore[method-assign]
        HboneEnd.drained = lambda self, n, size: False  # type: ignore[method-assign]
    ids = LocalIdentityProvider(ThrowawayCA())
    ids.ensure(A)
    ids.ensure(B)
    plain = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    tls = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    tls_port = tls.socket.getsockname()[1]
    pool = TunnelPool(netns=_Loopback(), identities=ids, port=tls_port)  # type: ignore[arg-type]

    async def outbound(client: trio.SocketStream) -> None:
        stream, _ = await pool.open_stream(
            source_identity=A,
            expected_identity=B,
            request=ConnectRequest("127.0.0.1", echo_port),
        )
        await relay(client, stream, fast=fast)

    async def inbound(accepted: trio.SocketStream) -> None:
        conn, _ = await accept_hbone(detach(accepted), identities=ids, identity=B)

        async def one(stream: HboneStream) -> None:
            upstream = await trio.open_tcp_stream("127.0.0.1", echo_port)
            await stream.respond(200)
            await relay(stream, upstream, fast=fast)

        await conn.run(one)

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        nursery.start_soon(trio.serve_listeners, outbound, [plain])
        nursery.start_soon(trio.serve_listeners, inbound, [tls])
        print(plain.socket.getsockname()[1], flush=True)


class _Loopback:
    """The pool's `Netns` for this measurement: plain sockets in the current namespace."""

    def socket(self, family: int, kind: int) -> socket.socket:
        return socket.socket(family, kind)


def cpu(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def echo_server(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def serve(c: socket.socket) -> None:
            with c:
                while data := c.recv(262144):
                    c.sendall(data)

        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def churn(port: int, pid: int) -> dict[str, float]:
    """New connections, one after another, each one 64-byte round trip: the rate and the
    child's CPU per connection (a new app connection costs a CONNECT stream, not a handshake,
    while its pooled connection lives)."""
    msg = b"y" * 64
    c0, t0 = cpu(pid), time.perf_counter()
    for _ in range(CONNECTIONS):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(msg)
            got = b""
            while len(got) < 64:
                got += s.recv(64)
    c1, t1 = cpu(pid), time.perf_counter()
    return {
        "conns_per_s": CONNECTIONS / (t1 - t0),
        "conn_cpu_us": (c1 - c0) / CONNECTIONS * 1e6,
    }


def measure(echo_port: int, fast: bool) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(echo_port), "fast" if fast else "generic"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        out: dict[str, float] = {}
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = b"x" * 64
            for _ in range(200):  # warm-up (handshake, first buffers)
                s.sendall(msg)
                s.recv(64)
            c0, t0 = cpu(proc.pid), time.perf_counter()
            for _ in range(ROUND_TRIPS):
                s.sendall(msg)
                got = s.recv(64)
                while len(got) < 64:
                    got += s.recv(64 - len(got))
            c1, t1 = cpu(proc.pid), time.perf_counter()
            out["rr_cpu_us"] = (c1 - c0) / ROUND_TRIPS * 1e6
            out["rr_wall_us"] = (t1 - t0) / ROUND_TRIPS * 1e6
        out.update(churn(port, proc.pid))
        if os.environ.get("MEASURE_RR_ONLY"):
            return out
        with socket.create_connection(("127.0.0.1", port)) as s:
            received = [0]

            def drain() -> None:
                while received[0] < BULK and (data := s.recv(262144)):
                    received[0] += len(data)

            reader = threading.Thread(target=drain)
            c0, t0 = cpu(proc.pid), time.perf_counter()
            reader.start()
            block = os.urandom(262144)
            for _ in range(BULK // len(block)):
                s.sendall(block)
            reader.join(60)
            c1, t1 = cpu(proc.pid), time.perf_counter()
            assert received[0] == BULK, received[0]
            out["bulk_mib_s"] = BULK / 2**20 / (t1 - t0)
            out["bulk_cpu_ms_per_mib"] = (c1 - c0) / (BULK / 2**20) * 1000
        return out
    finally:
        proc.kill()
        proc.wait(10)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        trio.run(child, int(sys.argv[2]), sys.argv[3] == "fast")
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    threading.Thread(target=echo_server, args=(listener,), daemon=True).start()
    port = listener.getsockname()[1]
    for fast in (False, True, False, True):
        figures = measure(port, fast)
        print("fast   " if fast else "generic", {k: round(v, 1) for k, v in figures.items()})


if __name__ == "__main__":
    main()
