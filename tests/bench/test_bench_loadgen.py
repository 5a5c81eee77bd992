"""The load generator against the bench server on loopback: real sockets, short runs."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from nodeagent.bench.loadgen import Generator, Plan, probe
from nodeagent.bench.server import Server


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server({"echo": 0, "http": 0, "bulk": 0}, "127.0.0.1")
    stop = threading.Event()
    t = threading.Thread(target=srv.serve_forever, args=(stop,))
    t.start()
    try:
        yield srv
    finally:
        stop.set()
        t.join(timeout=5)
        assert not t.is_alive()


def plan(mode: str, port: int, rate: float = 0.0, **kw: object) -> Plan:
    base: dict[str, object] = {
        "mode": mode, "host": "127.0.0.1", "port": port, "rate": rate, "duration": 0.4,
        "warmup": 0.1, "connections": 4, "size": 64, "http_host": "bench", "path": "/",
    }  # fmt: skip
    base.update(kw)
    return Plan(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["rr", "connect", "http"])
def test_fixed_rate_sends_on_schedule(server: Server, mode: str) -> None:
    port = server.port("http" if mode == "http" else "echo")
    out = Generator(plan(mode, port, rate=500.0)).run()
    assert out["errors"] == 0, out
    # Requests intended within the 0.4 s measured window: 200 (± the boundary one).
    assert 199 <= out["requests"] <= 201
    lat = out["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["p50"] < 50


def test_max_rate_runs_closed_loop(server: Server) -> None:
    out = Generator(plan("rr", server.port("echo"))).run()
    assert out["errors"] == 0
    assert out["achieved_rate"] > 500  # loopback echo: far more than the fixed rates above


def test_bulk_transfers_the_bytes_asked(server: Server) -> None:
    out = Generator(plan("bulk", server.port("bulk"), size=8 * 1024 * 1024, connections=2)).run()
    assert out["bytes"] == 16 * 1024 * 1024
    assert out["mb_per_s"] > 0


def test_probe_and_a_refused_target(server: Server) -> None:
    assert probe("127.0.0.1", server.port("echo"), 2.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not probe("127.0.0.1", closed, 1.0)
    with pytest.raises(ConnectionRefusedError):
        Generator(plan("rr", closed, rate=100.0)).run()


def test_server_answers_pipelined_http(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port("http")), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n")
        got = b""
        while got.count(b"\r\n\r\nok") < 2:
            chunk = s.recv(4096)
            assert chunk, "server closed early"
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize(("mode", "rate"), [("connect", 200.0), ("rr", 200.0), ("connect", 0.0)])
def test_a_target_that_never_answers_counts_every_request_as_failed(mode: str, rate: float) -> None:
    # A listener nobody accepts from: the kernel completes the handshakes, no byte comes back.
    # The run ends `drain` s after its window and reports each unanswered request as failed
    # (the figures of a saturated proxy), instead of raising away the whole bench.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        port = listener.getsockname()[1]
        out = Generator(plan(mode, port, rate=rate, duration=0.2, drain=0.3)).run()
    assert out["requests"] == 0
    assert out["unanswered"] > 0
    assert out["errors"] == out["unanswered"]
    if rate:  # every request intended in warm-up and window: 0.3 s at 200/s
        assert 55 <= out["unanswered"] <= 61
    else:  # closed loop: one request in flight per connection
        assert out["unanswered"] == 4
    assert out["first_error"] == f"{out['unanswered']} requests unanswered 0.3 s after the run"
