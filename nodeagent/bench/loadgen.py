"""The load generator, run inside a client pod: `python -m nodeagent.bench.loadgen MODE …`.

Debian has neither wrk2 nor a constant-rate `hey` that corrects for coordinated omission (its
`hey` 0.1.4 only rate-limits each worker and measures from the actual send), and wrk is
closed-loop; so this is a small open-loop generator in the style of wrk2: with `--rate R`,
request i is due at `start + i/R` and its latency is measured from that intended time
(`nodeagent.bench.stats`), whether or not a connection was free to send it then. `--rate 0`
runs closed-loop at the maximum rate (each connection sends its next request at once).

Modes: `rr` (small request/response on persistent connections, against the echo port), `connect`
(a new TCP connection per request: connect, send, read the echo, close), `http` (HTTP/1.1
keep-alive GET), `bulk` (download N bytes per transfer, throughput), `probe` (one echo round
trip, exit 0 if it worked). The result is one JSON object on stdout.

One thread, one select(2) loop (microsecond timeouts), non-blocking sockets. A request may still
leave a little after its intended time (timer slack, scheduling); that lag is measured
("send_lag_ms") and is the same in every set-up, so it cancels out of added latency.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import selectors
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.bench.stats import Recorder, Schedule

RECV = 256 * 1024
MAX_IN_FLIGHT_CONNECTS = 512
HTTP_MAX_HEAD = 16 * 1024


class LoadError(Exception):
    """The generator could not run as asked (connect refused, peer closed…)."""


@dataclass(slots=True)
class Conn:
    sock: socket.socket
    connected: bool = True
    intended: float = 0.0
    sent: float = 0.0
    busy: bool = False
    buf: bytearray = field(default_factory=bytearray)
    need: int = 0


@dataclass(slots=True)
class Plan:
    mode: str
    host: str
    port: int
    rate: float
    duration: float
    warmup: float
    connections: int
    size: int
    http_host: str
    path: str
    drain: float = 10.0  # seconds after the run that unanswered requests are still awaited


class Generator:
    def __init__(self, plan: Plan) -> None:
        self.p = plan
        # select(2), not epoll: its timeout has microsecond precision where epoll's has
        # millisecond, and that precision is what keeps requests on schedule. Fewer than
        # FD_SETSIZE descriptors are ever open (MAX_IN_FLIGHT_CONNECTS caps the connect mode).
        self.sel = selectors.SelectSelector()
        self.rec = Recorder()
        self.payload = b"x" * plan.size
        self.request = (
            f"GET {plan.path} HTTP/1.1\r\nhost: {plan.http_host}\r\n"
            "user-agent: nodeagent-bench\r\n\r\n"
        ).encode()
        self.idle: collections.deque[Conn] = collections.deque()
        self.pending: collections.deque[float] = collections.deque()
        self.in_flight = 0
        self.lag_total = 0.0
        self.started = 0
        self.first_error = ""
        self.unanswered = 0

    # ----- connections --------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        return s

    def _open_blocking(self) -> Conn:
        s = socket.create_connection((self.p.host, self.p.port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        c = Conn(s)
        self.sel.register(s, selectors.EVENT_READ, c)
        return c

    def _close(self, c: Conn, *, reset: bool = False) -> None:
        self.sel.unregister(c.sock)
        if reset:
            # RST instead of FIN: no TIME_WAIT pile-up from thousands of short connections.
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()

    # ----- one request --------------------------------------------------------------------------

    def _start(self, c: Conn, intended: float, now: float) -> None:
        c.intended, c.sent, c.busy = intended, now, True
        self.lag_total += now - intended
        self.started += 1
        c.buf.clear()
        if self.p.mode == "http":
            c.need = -1
            data = self.request
        else:
            c.need = self.p.size
            data = self.payload
        n = c.sock.send(data)  # small: fits the empty socket buffer
        if n != len(data):
            raise LoadError(f"short send of a {len(data)}-byte request ({n})")

    def _start_connect(self, intended: float, now: float) -> None:
        s = self._socket()
        err = s.connect_ex((self.p.host, self.p.port))
        c = Conn(s, connected=False, intended=intended, sent=now, busy=True, need=self.p.size)
        self.lag_total += now - intended
        self.started += 1
        self.in_flight += 1
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.in_flight -= 1
            self._error(f"connect: {errno.errorcode.get(err, err)}")
            return
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def _error(self, what: str) -> None:
        self.rec.error()
        self.first_error = self.first_error or what

    def _give_up(self, unanswered: int) -> None:
        """The run is over and `unanswered` requests never got their answer: each is a failed
        request (an overloaded proxy's queue, a stuck connection), counted and named, so a run
        that saturates still reports what it measured."""
        self.unanswered = unanswered
        self.rec.errors += unanswered
        what = f"{unanswered} requests unanswered {self.p.drain:g} s after the run"
        self.first_error = self.first_error or what

    def _complete(self, c: Conn, now: float, measuring: bool) -> None:
        c.busy = False
        if measuring:
            self.rec.record(c.intended, c.sent, now)

    def _on_event(self, c: Conn, events: int, now: float, measuring: bool) -> bool:
        """Handle readiness; True when `c` finished a request (and is idle or closed)."""
        if not c.connected:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.in_flight -= 1
                self._close(c)
                self._error(f"connect: {errno.errorcode.get(err, err)}")
                return False
            c.connected = True
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            try:
                c.sock.send(self.payload)
            except OSError as exc:
                self.in_flight -= 1
                self._close(c)
                self._error(f"send after connect: {exc}")
            return False
        try:
            data = c.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            data = b""
            self.first_error = self.first_error or f"recv: {exc}"
        if not data:
            if self.p.mode == "connect":
                self.in_flight -= 1
            self._close(c)
            if c.busy:
                self._error("connection closed by the peer mid-request")
            if self.p.mode != "connect":
                raise LoadError(
                    f"{self.p.host}:{self.p.port} closed a persistent connection: "
                    f"{self.first_error or 'EOF'}"
                )
            return False
        if self.p.mode == "http":
            c.buf += data
            if c.need < 0:
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(c.buf) > HTTP_MAX_HEAD:
                        raise LoadError("HTTP response head over 16 KiB")
                    return False
                head = bytes(c.buf[:end]).lower()
                if not head.startswith(b"http/1.1 200"):
                    self._error(f"HTTP status: {head[:40]!r}")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip() == b"content-length":
                        length = int(value)
                c.need = end + 4 + length
            if len(c.buf) < c.need:
                return False
            if len(c.buf) > c.need:
                raise LoadError("HTTP response longer than its content-length")
        else:
            c.need -= len(data)
            if c.need > 0:
                return False
        self._complete(c, now, measuring)
        if self.p.mode == "connect":
            self.in_flight -= 1
            self._close(c, reset=True)
        return True

    # ----- the loops ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.p.mode == "bulk":
            return self._bulk()
        if self.p.mode != "connect":
            for _ in range(self.p.connections):
                self.idle.append(self._open_blocking())
        started = time.perf_counter()
        measure_from = started + self.p.warmup
        end = measure_from + self.p.duration
        if self.p.rate > 0:
            self._open_loop(Schedule(started, self.p.rate), measure_from, end)
        else:
            self._closed_loop(measure_from, end)
        elapsed = self.p.duration
        for key in list(self.sel.get_map().values()):
            self.sel.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
        n = len(self.rec)
        out: dict[str, Any] = {
            "mode": self.p.mode,
            "target": f"{self.p.host}:{self.p.port}",
            "rate": self.p.rate,
            "connections": self.p.connections,
            "duration": elapsed,
            "requests": n,
            "errors": self.rec.errors,
            "unanswered": self.unanswered,
            "achieved_rate": n / elapsed,
            "latency_ms": self.rec.summary(),
            "send_lag_ms": 0.0,
            "first_error": self.first_error or None,
        }
        return out

    def _open_loop(self, sched: Schedule, measure_from: float, end: float) -> None:
        next_i = 0
        last_i = sched.due(end)  # requests due before `end` are sent and awaited
        drain_until = end + self.p.drain
        connect = self.p.mode == "connect"
        select = self.sel.select
        while True:
            now = time.perf_counter()
            due = min(sched.due(now), last_i)
            while next_i < due:
                self.pending.append(sched.intended(next_i))
                next_i += 1
            while self.pending:
                if connect:
                    if self.in_flight >= MAX_IN_FLIGHT_CONNECTS:
                        break
                    self._start_connect(self.pending.popleft(), now)
                elif self.idle:
                    self._start(self.idle.popleft(), self.pending.popleft(), now)
                else:
                    break
            busy = self.in_flight if connect else self.p.connections - len(self.idle)
            if next_i >= last_i and not self.pending and busy == 0:
                return
            if now > drain_until:
                self._give_up(busy + len(self.pending) + last_i - next_i)
                return
            timeout = max(0.0, sched.intended(next_i) - now) if next_i < last_i else 0.05
            for key, events in select(timeout):
                t = time.perf_counter()
                c: Conn = key.data
                measuring = c.intended >= measure_from
                if self._on_event(c, events, t, measuring) and not connect:
                    self.idle.append(c)

    def _closed_loop(self, measure_from: float, end: float) -> None:
        connect = self.p.mode == "connect"
        now = time.perf_counter()
        if connect:
            for _ in range(self.p.connections):
                self._start_connect(now, now)
        else:
            while self.idle:
                self._start(self.idle.popleft(), now, now)

        def busy() -> bool:
            return self.in_flight > 0 if connect else len(self.idle) < self.p.connections

        while busy():
            if time.perf_counter() > end + self.p.drain:
                self._give_up(self.in_flight if connect else self.p.connections - len(self.idle))
                return
            for key, events in self.sel.select(0.05):
                t = time.perf_counter()
                c: Conn = key.data
                if not self._on_event(c, events, t, c.intended >= measure_from):
                    continue
                if t >= end:
                    if not connect:
                        self.idle.append(c)
                elif connect:
                    self._start_connect(t, t)
                else:
                    self._start(c, t, t)

    def _bulk(self) -> dict[str, Any]:
        rates: list[float] = []
        total = 0
        buf = bytearray(RECV)
        for _ in range(max(1, self.p.connections)):
            t0 = time.perf_counter()
            with socket.create_connection((self.p.host, self.p.port), timeout=30) as s:
                s.sendall(struct.pack("!Q", self.p.size))
                got = 0
                while got < self.p.size:
                    n = s.recv_into(buf)
                    if n == 0:
                        raise LoadError(f"bulk: the peer closed after {got} of {self.p.size} bytes")
                    got += n
            dt = time.perf_counter() - t0
            total += got
            rates.append(got / dt / 1e6)
        rates.sort()
        return {
            "mode": "bulk",
            "target": f"{self.p.host}:{self.p.port}",
            "transfers": len(rates),
            "bytes": total,
            "mb_per_s": rates[len(rates) // 2],
            "mb_per_s_all": rates,
            "errors": 0,
        }


def probe(host: str, port: int, timeout: float) -> bool:
    """One echo round trip within `timeout`: does anything answer at host:port?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"probe")
            got = b""
            while len(got) < 5:
                chunk = s.recv(5 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == b"probe"
    except OSError:
        return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.bench.loadgen", description=__doc__)
    parser.add_argument("mode", choices=["rr", "connect", "http", "bulk", "probe"])
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = max (closed)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--connections", type=int, default=16, help="bulk: number of transfers")
    parser.add_argument("--size", type=int, default=64, help="request bytes; bulk: bytes/transfer")
    parser.add_argument("--http-host", default="bench")
    parser.add_argument("--path", default="/")
    parser.add_argument("--timeout", type=float, default=2.0, help="probe timeout")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    host, _, port_text = args.target.rpartition(":")
    if not host or not port_text.isdigit():
        print(f"loadgen: target {args.target!r} is not HOST:PORT", file=sys.stderr)
        return 2
    if args.mode == "probe":
        return 0 if probe(host, int(port_text), args.timeout) else 1
    plan = Plan(
        mode=args.mode,
        host=host,
        port=int(port_text),
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        size=args.size,
        http_host=args.http_host,
        path=args.path,
    )
    gen = Generator(plan)
    try:
        out = gen.run()
    except (LoadError, OSError) as exc:
        print(json.dumps({"error": f"{args.mode} {args.target}: {exc}"}))
        return 1
    if gen.started:
        out["send_lag_ms"] = gen.lag_total / gen.started * 1000.0
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
