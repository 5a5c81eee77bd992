"""Constant load for the rollout demo and tests, run in a pod: `python -I steady.py HOST PORT PATH
RATE SECONDS [USER-AGENT...]` sends GETs at about RATE per second (over keep-alive connections,
one per 25 requests/s of RATE, at least 2) until SECONDS have passed or SIGTERM arrives, cycling
through the USER-AGENTs given. Prints "started T" (unix seconds) once, then one "result {json}"
line: `requests` is a list of [unix time sent, status (0: no answer), version the body names
("-": none), user-agent index (-1: none given), unix time the answer was read]. Standard
library only, run by path."""

from __future__ import annotations

import http.client
import json
import re
import signal
import sys
import threading
import time

VERSION = re.compile(r"version=(\S+)")
PER_CONNECTION = 25.0  # requests/s one keep-alive connection is asked to carry


def worker(
    host: str,
    port: int,
    path: str,
    period: float,
    agents: list[str],
    offset: int,
    stop: threading.Event,
    out: list[list[object]],
    lock: threading.Lock,
) -> None:
    conn: http.client.HTTPConnection | None = None
    next_at = time.monotonic()
    i = offset
    while not stop.is_set():
        ua = i % len(agents) if agents else -1
        headers = {"User-Agent": agents[ua]} if agents else {}
        i += 1
        status, version = 0, "-"
        sent = time.time()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            status = r.status
            m = VERSION.search(body)
            version = m.group(1) if m else "-"
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
        with lock:
            out.append([sent, status, version, ua, time.time()])
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            next_at = time.monotonic()  # behind: no burst to catch up


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print("usage: steady.py HOST PORT PATH RATE SECONDS [USER-AGENT...]", file=sys.stderr)
        return 2
    host, port, path = argv[0], int(argv[1]), argv[2]
    rate, seconds, agents = float(argv[3]), float(argv[4]), argv[5:]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    connections = max(2, round(rate / PER_CONNECTION))
    period = connections / rate
    out: list[list[object]] = []
    lock = threading.Lock()
    print(f"started {time.time()!r}", flush=True)
    threads = [
        threading.Thread(target=worker, args=(host, port, path, period, agents, k, stop, out, lock))
        for k in range(connections)
    ]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    out.sort(key=lambda r: float(r[0]))  # type: ignore[arg-type]
    print("result " + json.dumps({"requests": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
