"""`trickle.py HOST PORT MODE AUTHORITY`: a slow client. MODE "head": a request head one header
line a second, never finished; "body": a 100-byte body one byte a second. Prints the seconds
until the proxy answered or closed, and what it sent.
"""

import json
import socket
import sys
import threading
import time

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
    s.sendall(
        b"POST /trickle HTTP/1.1\r\nHost: "
        + authority.encode()
        + b"\r\nContent-Length: 100\r\n\r\n"
    )
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
print(
    json.dumps(
        {
            "seconds": time.monotonic() - started,
            "closed": bool(got) and got[-1] is None,
            "received": data.decode("latin-1"),
        }
    )
)
