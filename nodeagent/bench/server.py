"""The benchmark's application server, run inside a server pod: echo, HTTP/1.1, and bulk.

`python -m nodeagent.bench.server [--echo PORT] [--http PORT] [--bulk PORT]`

- echo: every byte received is sent back (request/response scenarios, new connection per request).
- http: a minimal keep-alive HTTP/1.1 responder: each request head (up to `\\r\\n\\r\\n`, no body)
  gets `200` with a 2-byte body. Just enough for wrk and the load generator; not a web server.
- bulk: the client sends an 8-byte big-endian count N, the server sends N bytes and closes.

One thread, one epoll loop, non-blocking sockets: the server must cost the same in every set-up
and stay far from being the bottleneck, so it does the least work a server can do.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n"
    b"server: nodeagent-bench\r\n\r\nok"
)
MAX_HEAD = 16 * 1024
BULK_CHUNK = bytes(1024 * 1024)
RECV = 64 * 1024


@dataclass(slots=True)
class Conn:
    sock: socket.socket
    kind: str
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    bulk_left: int = -1  # bulk: bytes still to send; -1 until the count arrived


class Server:
    def __init__(self, ports: dict[str, int], host: str = "0.0.0.0") -> None:
        self.sel = selectors.DefaultSelector()
        self.listeners: list[socket.socket] = []
        for kind, port in ports.items():
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                ls.bind((host, port))
            except OSError as exc:
                raise OSError(f"bench server: bind {kind} {host}:{port}: {exc.strerror}") from exc
            ls.listen(1024)
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, kind)
            self.listeners.append(ls)

    def port(self, kind: str) -> int:
        """The port a listener is bound to (useful after binding port 0)."""
        for key in self.sel.get_map().values():
            if key.data == kind:
                return int(key.fileobj.getsockname()[1])  # type: ignore[union-attr]
        raise KeyError(f"no {kind} listener")

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Serve until `stop` is set (checked every 0.1 s), then close every socket."""
        try:
            while stop is None or not stop.is_set():
                self._step(None if stop is None else 0.1)
        finally:
            for key in list(self.sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            self.sel.close()

    def _step(self, timeout: float | None) -> None:
        for key, events in self.sel.select(timeout):
            if isinstance(key.data, str):
                self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
            else:
                self._service(key.data, events)

    def _accept(self, ls: socket.socket, kind: str) -> None:
        while True:
            try:
                sock, _ = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: the client sees the refusal
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(sock, selectors.EVENT_READ, Conn(sock, kind))

    def _close(self, c: Conn) -> None:
        self.sel.unregister(c.sock)
        c.sock.close()

    def _service(self, c: Conn, events: int) -> None:
        if events & selectors.EVENT_READ:
            try:
                data = c.sock.recv(RECV)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._close(c)
                return
            if data == b"":
                self._close(c)
                return
            if data:
                if c.kind == "echo":
                    c.outbuf += data
                elif c.kind in ("http", "http-l4"):
                    c.inbuf += data
                    self._http(c)
                    if len(c.inbuf) > MAX_HEAD:
                        self._close(c)
                        return
                else:
                    c.inbuf += data
                    if c.bulk_left < 0 and len(c.inbuf) >= 8:
                        (c.bulk_left,) = struct.unpack("!Q", bytes(c.inbuf[:8]))
        self._flush(c)

    def _http(self, c: Conn) -> None:
        while True:
            end = c.inbuf.find(b"\r\n\r\n")
            if end < 0:
                return
            del c.inbuf[: end + 4]
            c.outbuf += HTTP_RESPONSE

    def _flush(self, c: Conn) -> None:
        try:
            while c.outbuf:
                n = c.sock.send(c.outbuf)
                del c.outbuf[:n]
            while c.bulk_left > 0:
                n = c.sock.send(memoryview(BULK_CHUNK)[: min(c.bulk_left, len(BULK_CHUNK))])
                c.bulk_left -= n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(c)
            return
        if c.bulk_left == 0:
            self._close(c)
            return
        want = selectors.EVENT_READ
        if c.outbuf or c.bulk_left > 0:
            want |= selectors.EVENT_WRITE
        if self.sel.get_key(c.sock).events != want:
            self.sel.modify(c.sock, want, c)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.bench.server", description=__doc__)
    parser.add_argument("--echo", type=int, default=7000)
    parser.add_argument("--http", type=int, default=8080, help="0: no HTTP listener (nginx serves)")
    parser.add_argument("--bulk", type=int, default=7001)
    parser.add_argument(
        "--http-l4", type=int, default=0, help="a second HTTP listener (a Service `tcp-` port)"
    )
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        ports = {"echo": args.echo, "http": args.http, "bulk": args.bulk, "http-l4": args.http_l4}
        server = Server({kind: port for kind, port in ports.items() if port}, args.host)
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"bench server: echo {args.echo} http {args.http} bulk {args.bulk}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
