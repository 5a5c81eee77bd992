"""The demo's backend app, run in each pod: `python -I backend.py VERSION [PORT]` serves HTTP/1.1
(keep-alive) on 0.0.0.0:PORT (default 8080), says "serving on PORT" once bound, and answers every
GET with "version=VERSION path=PATH". Standard library only, run by path (not `-m`), so a pod
starts it without importing the mesh."""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 8080


def answer(version: str, path: str) -> bytes:
    """The body: the demo reads the version back to count which subset served a request."""
    return f"version={version} path={path}\n".encode()


def handler(version: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request would drown the pod's log

        def do_GET(self) -> None:
            body = answer(version, self.path)
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or not (argv[1:] or ["0"])[0].isdigit():
        print("usage: backend.py VERSION [PORT]", file=sys.stderr)
        return 2
    port = int(argv[1]) if len(argv) == 2 else PORT
    server = ThreadingHTTPServer(("0.0.0.0", port), handler(argv[0]))
    server.daemon_threads = True
    print(f"serving on {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
