"""The demo's load generator, run on the outside host: `python -I load.py HOST PORT PATH N
CONCURRENCY` sends N GETs over CONCURRENCY keep-alive connections and counts the version each
answer names (see backend.py). Prints "progress K" lines as it goes, then one
"result {versions, codes, errors}" line of JSON. Standard library only, run by path."""

from __future__ import annotations

import http.client
import json
import re
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

PROGRESS_EVERY = 250
VERSION = re.compile(r"version=(\S+)")


@dataclass
class Tally:
    """What the workers saw, shared under one lock."""

    total: int
    versions: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, status: int, version: str, error: str | None) -> None:
        with self.lock:
            self.versions[version] += 1
            self.codes[str(status)] += 1
            if error is not None:
                self.errors.append(error)
            self.done += 1
            if self.done % PROGRESS_EVERY == 0 and self.done < self.total:
                print(f"progress {self.done}", flush=True)

    def result(self) -> dict[str, object]:
        return {"versions": self.versions, "codes": self.codes, "errors": self.errors[:3]}


def worker(host: str, port: int, path: str, requests: int, tally: Tally) -> None:
    conn: http.client.HTTPConnection | None = None
    for _ in range(requests):
        status, version, error = 0, "-", None
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            status = r.status
            m = VERSION.search(body)
            version = m.group(1) if m else "-"
            if (r.getheader("connection") or "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            if conn is not None:
                conn.close()
            conn = None
            error = repr(e)
        tally.count(status, version, error)


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: load.py HOST PORT PATH N CONCURRENCY", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: end quietly, the demo reports it
    host, port, path, n, c = argv[0], int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    tally = Tally(total=n)
    shares = [n // c + (i < n % c) for i in range(c)]
    threads = [threading.Thread(target=worker, args=(host, port, path, k, tally)) for k in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("result " + json.dumps(tally.result()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
