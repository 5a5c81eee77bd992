"""Pieces of the HTTP hardening sandbox tests: a backend that records every byte and every
request it receives, raw-socket clients (a smuggling corpus runner, a trickler), reading the
agents' access-log lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh_helpers import apply, client_pods, eventually, http
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox

HTTP_TESTS = Path(__file__).resolve().parent.parent / "http"
CORPUS = HTTP_TESTS / "smuggling_corpus.json"

# `recorder.py PORT`: HTTP/1.1 keep-alive, answers 200 "ok <path>". Every byte received goes to
# stdout as `raw <repr>`, every request parsed as `req <method> <path>` (so a smuggled request
# shows up in either). /slow answers after 5 s, /stall never answers, /stall-body sends a head
# and half of its body, then nothing.
RECORDER = r"""
import socket, sys, threading, time
PORT = int(sys.argv[1])
lock = threading.Lock()
def out(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
def serve(conn):
    buf = b""
    def more():
        nonlocal buf
        data = conn.recv(65536)
        out("raw " + repr(data))
        if not data:
            raise EOFError
        buf += data
    def line():
        nonlocal buf
        while b"\r\n" not in buf:
            more()
        i = buf.index(b"\r\n")
        text, buf = buf[:i], buf[i + 2:]
        return text
    def take(n):
        nonlocal buf
        while len(buf) < n:
            more()
        data, buf = buf[:n], buf[n:]
        return data
    try:
        while True:
            request = line()
            if not request:
                continue
            headers = {}
            while True:
                h = line()
                if not h:
                    break
                k, _, v = h.partition(b":")
                headers[k.strip().lower()] = v.strip()
            method, path = request.split(b" ")[:2]
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size = int(line().split(b";")[0], 16)
                    if size == 0:
                        while line():
                            pass
                        break
                    take(size + 2)
            else:
                take(int(headers.get(b"content-length", b"0")))
            out(f"req {method.decode()} {path.decode()}")
            if path.startswith(b"/slow"):
                time.sleep(5)
            if path.startswith(b"/stall-body"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf.")
                time.sleep(60)
            if path.startswith(b"/stall"):
                time.sleep(60)
            body = b"ok " + path
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except (EOFError, OSError, ValueError):
        pass
    finally:
        conn.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# `smuggle.py HOST PORT CORPUS HOSTHEADER`: every case of the corpus, each on a new connection in
# one write; prints one JSON line per case: the status line's code, whether the proxy closed
# the connection (EOF within 5 s), everything received.
SMUGGLE = r"""
import json, socket, sys, time
host, port, corpus, authority = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
doc = json.load(open(corpus))
def run(name, raw):
    raw = raw.replace(b"Host: app\r\n", b"Host: " + authority.encode() + b"\r\n")
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(raw)
    got, closed = b"", False
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                closed = True
                break
            got += data
    except (socket.timeout, ConnectionResetError):
        closed = isinstance(sys.exc_info()[1], ConnectionResetError)
    s.close()
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0
    print(json.dumps({"name": name, "status": status, "closed": closed,
                      "answers": got.count(b"HTTP/1.1 "), "received": got.decode("latin-1")}),
          flush=True)
for case in doc["attacks"]:
    run(case["name"], case["request"].encode("latin-1"))
for case in doc["controls"]:
    raw = case["request"].encode("latin-1").replace(
        b"Host: app\r\n\r\n", b"Host: app\r\nConnection: close\r\n\r\n")
    run(case["name"], raw)
"""

# `trickle.py HOST PORT MODE`: a slow client. MODE "head": a request head one header line a
# second, never finished; "body": a 100-byte body one byte a second. Prints the seconds until
# the proxy answered or closed, and what it sent.
TRICKLE = r"""
import json, socket, sys, time, threading
host, port, mode, authority = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=30)
started = time.monotonic()
got = []
def reader():
    while True:
        try:
            data = s.recv(65536)
        except OSError:
            break
        if not data:
            break
        got.append(data)
    got.append(None)
threading.Thread(target=reader, daemon=True).start()
if mode == "head":
    s.sendall(b"GET /trickle HTTP/1.1\r\nHost: " + authority.encode() + b"\r\n")
else:
    s.sendall(b"POST /trickle HTTP/1.1\r\nHost: " + authority.encode()
              + b"\r\nContent-Length: 100\r\n\r\n")
for i in range(30):
    if got and got[-1] is None:
        break
    try:
        s.sendall(b"X-%d: a\r\n" % i if mode == "head" else b"x")
    except OSError:
        break
    time.sleep(1)
while not (got and got[-1] is None) and time.monotonic() - started < 40:
    time.sleep(0.05)
data = b"".join(g for g in got if g)
print(json.dumps({"seconds": time.monotonic() - started, "closed": bool(got) and got[-1] is None,
                  "received": data.decode("latin-1")}))
"""


def write_scripts(d: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("recorder", RECORDER), ("smuggle", SMUGGLE), ("trickle", TRICKLE)):
        path = d / f"{name}.py"
        path.write_text(text)
        out[name] = path
    return out


def recorded(pod: Pod) -> tuple[list[str], str]:
    """The requests a recorder pod parsed (`METHOD PATH`) and every byte it received."""
    lines = Path(pod.log).read_text(errors="replace").splitlines()
    reqs = [line[4:] for line in lines if line.startswith("req ")]
    raw = "\n".join(line for line in lines if line.startswith("raw "))
    return reqs, raw


def json_lines(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log records of `event` in an agent's log."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            doc = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if doc.get("event") == event:
            out.append(doc)
    return out


GW_HOST = "rec.example.com"
FQDN = "rec.default.svc.cluster.local"
TO_REC = [{"destination": {"host": FQDN, "port": {"number": 80}}}]


def recorder_behind_gateway(
    sb: Sandbox, files: Path, *, prefix: str, vip: str, routes: list[dict[str, Any]]
) -> dict[str, Pod]:
    """The recording backend `rec` on n2 behind Service `rec` (at `vip`) and the gateway
    (`Host: rec.example.com`), a meshed client on n1, and `routes` applied beside them; returns
    once both the mesh path and the gateway path answer."""
    scripts = write_scripts(files)
    rec = sb.pod_add(
        "n2", "default", "rec", ["python3", str(scripts["recorder"]), "8080"],
        service_account="rec", labels={"app": "rec"},
    )  # fmt: skip
    client, _ = client_pods(sb)
    gateway = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": f"{prefix}-gateway", "namespace": "default"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"},
                         "hosts": ["*"]}],
        },
    }  # fmt: skip
    gateway_route = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "rec-gw", "namespace": "default"},
        "spec": {
            "hosts": [GW_HOST],
            "gateways": [f"{prefix}-gateway"],
            "http": [{"route": TO_REC}],
        },
    }
    apply(sb, files, "rec", [service("rec", cluster_ip=vip), gateway, gateway_route, *routes])

    def both_paths_answer() -> bool:
        mesh, _, _ = http(sb, client, f"http://{vip}/ready")
        edge, _, _ = http(sb, "outside", f"{sb.gateway_url()}/ready", f"Host: {GW_HOST}")
        return mesh == 200 and edge == 200

    eventually(both_paths_answer, "rec answers through the mesh and the gateway", timeout=40)
    return {"rec": rec, "client": client}
