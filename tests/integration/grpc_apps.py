"""The real gRPC (grpcio) server and client of tests/integration/test_grpc.py, and an HTTP/2
(h2c) server for curl and h2load, as scripts a pod runs with the venv's Python. Generic
handlers with raw bytes messages: no proto, no codegen.

Server `grpc_server.py NAME DELAY_MS [MAX_AGE_MS]`, port 8080, service `test.Echo` (with
MAX_AGE_MS, grpcio's max connection age: a graceful GOAWAY to every connection that old):
  Unary    answers NAME (after DELAY_MS); UNAVAILABLE while /tmp/<NAME>.fail exists
  Slow     answers after 5 s
  Stream   request: a decimal count N; answers N messages "i:<i>" (server streaming)
  Bidi     echoes every message (bidirectional streaming)

Client `grpc_client.py TARGET MODE …` prints one JSON line:
  unary N METHOD [key=value…]  N sequential calls on one channel: {"answers": {…}, "codes": {…}}
  for SECONDS                   sequential Unary calls on one channel for SECONDS:
                                {"answers": {…}, "codes": {…}, "calls": n, "slowest_s": s}
  stream N                      {"count": c, "ordered": bool}
  bidi MIB                      MIB MiB echoed in 64 KiB messages: {"sent": n, "same": bool}

`banner.py` / `banner_client.py`: a server-first protocol (see below).

h2 server `h2_server.py NAME`, port 8080: HTTP/2 prior knowledge, answers 200 "NAME PATH"
(`/status/<code>`: that status).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from nodeagent.sandbox import Pod, Sandbox

PY = sys.executable  # the venv's Python: grpcio and nodeagent importable in the pods

SERVER = r"""
import os, sys, time
from concurrent import futures
import grpc

NAME, DELAY = sys.argv[1], float(sys.argv[2]) / 1000
ident = lambda b: b

def unary(request, context):
    if os.path.exists(f"/tmp/{NAME}.fail"):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{NAME} is failing")
    if DELAY:
        time.sleep(DELAY)
    return NAME.encode()

def slow(request, context):
    time.sleep(5)
    return b"slow"

def stream(request, context):
    for i in range(int(request)):
        yield f"i:{i}".encode()

def bidi(requests, context):
    for message in requests:
        yield message

handlers = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
    "Slow": grpc.unary_unary_rpc_method_handler(slow, ident, ident),
    "Stream": grpc.unary_stream_rpc_method_handler(stream, ident, ident),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
}
options = []
if len(sys.argv) > 3:
    options = [("grpc.max_connection_age_ms", int(sys.argv[3])),
               ("grpc.max_connection_age_grace_ms", 30000)]
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
server.add_insecure_port("0.0.0.0:8080")
server.start()
print("serving", flush=True)
server.wait_for_termination()
"""

CLIENT = r"""
import collections, hashlib, json, os, sys
import grpc

target, mode = sys.argv[1], sys.argv[2]
ident = lambda b: b
channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
if mode == "unary":
    n, method = int(sys.argv[3]), sys.argv[4]
    metadata = [tuple(kv.split("=", 1)) for kv in sys.argv[5:]]
    call = channel.unary_unary(f"/test.Echo/{method}", request_serializer=ident,
                               response_deserializer=ident)
    answers, codes = collections.Counter(), collections.Counter()
    for _ in range(n):
        try:
            answers[call(b"hi", metadata=metadata, timeout=30).decode()] += 1
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
    print(json.dumps({"answers": answers, "codes": codes}))
elif mode == "for":
    import time
    call = channel.unary_unary("/test.Echo/Unary", request_serializer=ident,
                               response_deserializer=ident)
    answers, codes, slowest = collections.Counter(), collections.Counter(), 0.0
    end = time.monotonic() + float(sys.argv[3])
    while (started := time.monotonic()) < end:
        try:
            answers[call(b"hi", timeout=30).decode()] += 1
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
        slowest = max(slowest, time.monotonic() - started)
    print(json.dumps({"answers": answers, "codes": codes, "calls": sum(codes.values()),
                      "slowest_s": slowest}))
elif mode == "stream":
    n = int(sys.argv[3])
    call = channel.unary_stream("/test.Echo/Stream", request_serializer=ident,
                                response_deserializer=ident)
    got = [m.decode() for m in call(str(n).encode(), timeout=120)]
    print(json.dumps({"count": len(got), "ordered": got == [f"i:{i}" for i in range(n)]}))
elif mode == "bidi":
    total = int(sys.argv[3]) * 1024 * 1024
    chunk = 64 * 1024
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    def messages():
        for i in range(total // chunk):
            block = os.urandom(chunk)
            sent_hash.update(block)
            yield block
    call = channel.stream_stream("/test.Echo/Bidi", request_serializer=ident,
                                 response_deserializer=ident)
    received = 0
    for message in call(messages(), timeout=300):
        got_hash.update(message)
        received += len(message)
    print(json.dumps({"sent": received, "same": sent_hash.digest() == got_hash.digest()}))
"""

H2_SERVER = r"""
import sys
import trio
from nodeagent.http2.conn import H2Connection

NAME = sys.argv[1]

async def handle(stream):
    headers = dict(stream.headers)
    path = headers[b":path"].decode()
    while await stream.receive_data():
        pass
    status = path.rsplit("/", 1)[1] if path.startswith("/status/") else "200"
    body = f"{NAME} {path}\n".encode()
    length = str(len(body)).encode()
    stream.send_headers([(b":status", status.encode()), (b"content-length", length)])
    await stream.send_data(body, end_stream=True)

async def serve(transport):
    await H2Connection(transport, client=False).run(handle)

trio.run(lambda: trio.serve_tcp(serve, 8080, host="0.0.0.0"))
"""


# A server-first protocol (the client waits for a greeting): `banner.py`, port 8080, says
# "HELLO\n" on connect, then echoes. `banner_client.py HOST` prints {"greeting_s": …, "echo": …}.
BANNER = r"""
import socket, threading
def serve(conn):
    with conn:
        conn.sendall(b"HELLO\n")
        while data := conn.recv(65536):
            conn.sendall(data)
s = socket.create_server(("0.0.0.0", 8080), reuse_port=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

BANNER_CLIENT = r"""
import json, socket, sys, time
started = time.monotonic()
c = socket.create_connection((sys.argv[1], 80), timeout=10)
greeting = c.recv(100)
took = time.monotonic() - started
c.sendall(b"ping")
echo = c.recv(100)
print(json.dumps({"greeting": greeting.decode(), "greeting_s": took, "echo": echo.decode()}))
"""


def write_apps(d: Path) -> dict[str, Path]:
    out = {}
    for name, text in (
        ("grpc_server", SERVER),
        ("grpc_client", CLIENT),
        ("h2_server", H2_SERVER),
        ("banner", BANNER),
        ("banner_client", BANNER_CLIENT),
    ):
        path = d / f"{name}.py"
        path.write_text(text)
        out[name] = path
    return out


def client(sb: Sandbox, pod: Pod, files: Path, *args: str, timeout: float = 120) -> Any:
    r = sb.exec(pod, [PY, str(files / "grpc_client.py"), *args], timeout=timeout)
    lines = [x for x in str(r.stdout).splitlines() if x.startswith("{")]
    assert lines, f"grpc client {args}: {r.stdout} {r.stderr}"
    return json.loads(lines[-1])


def unary(sb: Sandbox, pod: Pod, files: Path, vip: str, n: int, *extra: str) -> Any:
    method = extra[0] if extra else "Unary"
    return client(sb, pod, files, f"{vip}:80", "unary", str(n), method, *extra[1:])
