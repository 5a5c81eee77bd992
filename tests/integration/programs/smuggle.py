"""`smuggle.py HOST PORT CORPUS HOSTHEADER`: every case of the corpus, each on a new connection in
one write; prints one JSON line per case: the status line's code, whether the proxy closed the
connection (EOF within 5 s), everything received.
"""

import json
import socket
import sys
import time

host, port, corpus, authority = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(corpus) as f:
    doc = json.load(f)


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
    except (TimeoutError, ConnectionResetError):
        closed = isinstance(sys.exc_info()[1], ConnectionResetError)
    s.close()
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0
    print(
        json.dumps(
            {
                "name": name,
                "status": status,
                "closed": closed,
                "answers": got.count(b"HTTP/1.1 "),
                "received": got.decode("latin-1"),
            }
        ),
        flush=True,
    )


for case in doc["attacks"]:
    run(case["name"], case["request"].encode("latin-1"))
for case in doc["controls"]:
    raw = (
        case["request"]
        .encode("latin-1")
        .replace(b"Host: app\r\n\r\n", b"Host: app\r\nConnection: close\r\n\r\n")
    )
    run(case["name"], raw)
