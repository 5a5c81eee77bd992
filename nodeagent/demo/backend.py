"""The demo's backend app, run in each pod: `python -I backend.py VERSION [PORT] [--fail-every N]
[--delay-ms MS]` serves HTTP/1.1 (keep-alive) on 0.0.0.0:PORT (default 8080), says "serving on
PORT" once bound, and answers every GET with "version=VERSION path=PATH". A bad release for the
rollout demo and tests: `--fail-every 10` answers every 10th request 500 (exactly 10%),
`--delay-ms 300` answers each request 300 ms late. Standard library only, run by path (not
`-m`), so a pod starts it without importing the mesh."""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 8080


def answer(version: str, path: str) -> bytes:
    """The body: the demo reads the version back to count which subset served a request."""
    return f"version={version} path={path}\n".encode()


def handler(version: str, fail_every: int = 0, delay_ms: int = 0) -> type[BaseHTTPRequestHandler]:
    served = itertools.count(1)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request would drown the pod's log

        def do_GET(self) -> None:
            with lock:
                n = next(served)
            if delay_ms:
                time.sleep(delay_ms / 1000)
            body = answer(version, self.path)
            self.send_response(500 if fail_every and n % fail_every == 0 else 200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="backend.py", usage="backend.py VERSION [PORT] [--fail-every N] [--delay-ms MS]"
    )
    p.add_argument("version")
    p.add_argument("port", nargs="?", type=int, default=PORT)
    p.add_argument("--fail-every", type=int, default=0, metavar="N")
    p.add_argument("--delay-ms", type=int, default=0, metavar="MS")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    app = handler(args.version, args.fail_every, args.delay_ms)
    server = ThreadingHTTPServer(("0.0.0.0", args.port), app)
    server.daemon_threads = True
    print(f"serving on {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
