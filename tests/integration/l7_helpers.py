"""Shared pieces of the L7 sandbox tests (test_l7.py, test_gateway.py): the backend app, the
corpus paths, counting requests per backend, the binomial interval, `hey`'s status codes.
(meshctl, apply, eventually and curl live in mesh_helpers.py.)"""

from __future__ import annotations

import math
from pathlib import Path

from corpus import CORPUS

from nodeagent.sandbox import Pod

SEED = CORPUS / "seed"
BOOKINFO = CORPUS / "istio" / "bookinfo-networking"

# The backend: `app.py VERSION [PORT]`, HTTP/1.1 keep-alive. Answers "version=V path=P" and
# prints one "hit P" line per request to its log (so tests count who got what).
# /flaky answers 503 to every other request; /slow answers after 3 s.
APP = r"""
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
VERSION = sys.argv[1]
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 8080
lock = threading.Lock()
count = [0]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        with lock:  # one whole line per request, even from concurrent threads
            sys.stdout.write(f"hit {self.path}\n")
            sys.stdout.flush()
        status = 200
        if self.path.startswith("/flaky"):
            with lock:
                count[0] += 1
                status = 503 if count[0] % 2 else 200
        if self.path.startswith("/slow"):
            time.sleep(3)
        ua = self.headers.get("user-agent", "")
        body = f"version={VERSION} path={self.path} ua={ua}\n".encode()
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", PORT), H).serve_forever()
"""


def write_app(d: Path) -> list[str]:
    (d / "app.py").write_text(APP)
    return ["python3", str(d / "app.py")]


def hits(pod: Pod) -> list[str]:
    """The paths a backend pod served so far (its "hit P" log lines)."""
    return [
        line.split(" ", 1)[1]
        for line in Path(pod.log).read_text().splitlines()
        if line.startswith("hit ")
    ]


def binomial_interval(n: int, p: float, z: float = 3.29) -> tuple[float, float]:
    """The normal approximation of the binomial's two-sided 99.9% interval for the count."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - z * sd, n * p + z * sd


def hey_codes(output: str) -> dict[int, int]:
    """`hey`'s "Status code distribution:" lines (`[200] 1800 responses`) as a dict."""
    codes: dict[int, int] = {}
    section = False
    for line in output.splitlines():
        if line.startswith("Status code distribution"):
            section = True
            continue
        if section:
            parts = line.split()
            if len(parts) >= 2 and parts[0].startswith("[") and parts[0].endswith("]"):
                codes[int(parts[0][1:-1])] = int(parts[1])
            elif line.strip() and codes:
                break
    return codes
