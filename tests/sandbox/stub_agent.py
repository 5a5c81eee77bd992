"""A stand-in for `nodeagent run` in the sandbox's own tests (the real agent is tested elsewhere).

It does what the sandbox relies on and nothing more: parses the same flags, serves
`/healthz/ready` (200) on `<run-dir>/admin.sock`, and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socketserver
import sys
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/healthz/ready" else 404
        body = f"{os.getpid()}\n".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        print(format % args, file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--node", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--advertise-address")
    p.add_argument("--workers", type=int)  # the sandbox always says (SANDBOX_WORKERS)
    args = p.parse_args()
    sock = args.run_dir / "admin.sock"
    sock.unlink(missing_ok=True)
    server = socketserver.UnixStreamServer(str(sock), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"stub agent {args.node} store {args.store} pid {os.getpid()}", flush=True)
    try:
        server.serve_forever()
    finally:
        sock.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
