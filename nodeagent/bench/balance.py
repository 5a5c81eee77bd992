"""Balance bench: µs per pick for each balancer, per request round trip, and table builds.

A cluster of `--endpoints` endpoints with outlier detection on (so the sweep check is on the
path, as in production). "pick" is `picker.pick(ctx)` alone; "request" adds `start()` and
`finish(latency, outcome)` (the latency estimate and outlier counters). Consistent-hash picks hash
a header value that differs per request.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from nodeagent.balance import PickContext, Picker, resolve
from nodeagent.bench import Result
from nodeagent.snapshot.model import DestinationRule, Endpoint, freeze

NAME = "balance"
HELP = "µs per pick and per request for each balancer; ring and Maglev build times"

_POLICIES: dict[str, dict[str, Any]] = {
    "peak_ewma": {},
    "round_robin": {"simple": "ROUND_ROBIN"},
    "least_request": {"simple": "LEAST_REQUEST"},
    "random": {"simple": "RANDOM"},
    "ring_hash": {"consistentHash": {"httpHeaderName": "x-user"}},
    "maglev": {"consistentHash": {"httpHeaderName": "x-user", "maglev": {}}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--picks", type=int, default=100_000)


def _picker(name: str, n: int) -> Picker:
    policy = {
        "loadBalancer": _POLICIES[name],
        "outlierDetection": {"consecutive5xxErrors": 5, "maxEjectionPercent": 100},
    }
    dr = DestinationRule("bench", "dr", "bench.local", freeze({}), freeze(policy))
    eps = [Endpoint(f"10.2.{i >> 8}.{i & 255}", 8080) for i in range(n)]
    return Picker(
        f"bench-{name}", resolve(dr, None, 80), eps, now=time.monotonic, rng=random.Random(1)
    )


def run(args: argparse.Namespace) -> Result:
    result = Result(NAME, {"endpoints": args.endpoints, "picks": args.picks})
    n = args.picks
    ctxs = [PickContext(headers={"x-user": f"user-{i}"}) for i in range(1024)]
    for name in _POLICIES:
        t0 = time.perf_counter()
        p = _picker(name, args.endpoints)
        if name in ("ring_hash", "maglev"):
            result.add(f"{name} build", (time.perf_counter() - t0) * 1e3, "ms")
        pick = p.pick
        t0 = time.perf_counter()
        for i in range(n):
            pick(ctxs[i & 1023])
        result.add(f"{name} pick", (time.perf_counter() - t0) / n * 1e6, "µs")
        t0 = time.perf_counter()
        for i in range(n):
            h = pick(ctxs[i & 1023])
            h.start()
            h.finish(0.001)
        result.add(f"{name} request", (time.perf_counter() - t0) / n * 1e6, "µs")
    return result
