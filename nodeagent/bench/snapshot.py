"""Snapshot bench: build a large synthetic mesh, then measure single changes, bursts, lookups
and memory, side by side with a baseline commit (issue 22's targets in the last column).

The mesh is synthetic but shaped like a real one: services spread over namespaces, each with a
selector, two ports (one named targetPort) and `per_service` workloads over `nodes` nodes; every
10th service has a VirtualService splitting between two subsets and a DestinationRule; each
namespace has an AuthorizationPolicy and a PeerAuthentication.

The baseline (`--baseline REV`, default the code before issue 22) is measured by this same file:
it is copied into a temporary `git worktree` of REV and run there in a subprocess, so both
columns come from one measurement procedure on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from nodeagent.bench import Result
from nodeagent.snapshot import SnapshotBuilder
from nodeagent.store import codec, keys
from nodeagent.store.base import Event, KeyValue

NAME = "snapshot"
HELP = "full build, one-change updates, bursts, lookups and memory of the agent snapshot"
BASELINE = "7940b5e"
RETAINED = "memory retained after a full build"
RETAINED_IN_USE = "memory retained, every endpoint list looked up once"
# Issue 22's targets at 10,000 services / 50,000 workloads: metric → (bound, "≤").
TARGETS = {
    "full build": 3000.0,
    "apply 1 workload update (median)": 0.5,
    "apply 1 workload update (p99)": 2.0,
    "apply burst of workload registrations (one batch)": 200.0,
    "memory retained after a full build": 60.0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--per-service", type=int, default=5, help="workloads per service")
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=200, help="samples per update figure")
    parser.add_argument("--burst", type=int, default=1000, help="workload events in one burst")
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help=f"git revision measured alongside (default {BASELINE}: before issue 22); 'none' skips",
    )


def _ip(base: int, n: int) -> str:
    n += base
    return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def service_doc(i: int, namespaces: int) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % namespaces}"},
        "spec": {
            "selector": {"app": f"svc-{i}"},
            "clusterIP": _ip(0x0A600000, i + 1),  # 10.96.0.0/12
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "grpc-api", "port": 9090, "targetPort": "grpc"},
            ],
        },
    }


def workload_doc(
    i: int, j: int, per_service: int, namespaces: int, nodes: int
) -> dict[str, object]:
    n = i * per_service + j
    return {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {
            "name": f"svc-{i}-{j}",
            "namespace": f"ns-{i % namespaces}",
            "uid": f"uid-{n}",
            "labels": {"app": f"svc-{i}", "version": f"v{j % 2 + 1}"},
            "annotations": {},
        },
        "spec": {
            "node": f"node-{n % nodes}",
            "addresses": [_ip(0x0A800000, n + 1)],  # 10.128.0.0/9
            "serviceAccount": f"svc-{i}",
            "ports": [{"name": "grpc", "containerPort": 9091}],
        },
    }


def virtual_service_doc(i: int, namespaces: int, weight: int = 90) -> dict[str, object]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % namespaces}"},
        "spec": {
            "hosts": [f"svc-{i}"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": f"svc-{i}", "subset": "v1"}, "weight": weight},
                        {
                            "destination": {"host": f"svc-{i}", "subset": "v2"},
                            "weight": 100 - weight,
                        },
                    ]
                }
            ],
        },
    }


def synthetic(
    services: int, per_service: int, namespaces: int, nodes: int, *, policies: bool = True
) -> tuple[list[KeyValue], int]:
    """The store's documents for a synthetic mesh, as a listing: (kvs, revision); without
    `policies`, no VirtualServices, DestinationRules, AuthorizationPolicies, PeerAuthentications."""
    docs: list[tuple[str, object]] = []
    for i in range(services):
        ns = f"ns-{i % namespaces}"
        docs.append((keys.config("Service", ns, f"svc-{i}"), service_doc(i, namespaces)))
        for j in range(per_service):
            wl = workload_doc(i, j, per_service, namespaces, nodes)
            node = wl["spec"]["node"]  # type: ignore[index]
            docs.append((keys.workload(node, f"uid-{i * per_service + j}"), wl))
        if policies and i % 10 == 0:
            docs.append(
                (keys.config("VirtualService", ns, f"svc-{i}"), virtual_service_doc(i, namespaces))
            )
            dr = {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": f"svc-{i}", "namespace": ns},
                "spec": {
                    "host": f"svc-{i}",
                    "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                    "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}},
                    ],
                },
            }
            docs.append((keys.config("DestinationRule", ns, f"svc-{i}"), dr))
    for n in range(namespaces if policies else 0):
        ns = f"ns-{n}"
        ap = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-ns", "namespace": ns},
            "spec": {"rules": [{"from": [{"source": {"namespaces": [ns]}}]}]},
        }
        pa = {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": ns},
            "spec": {"mtls": {"mode": "STRICT"}},
        }
        docs.append((keys.config("AuthorizationPolicy", ns, "allow-ns"), ap))
        docs.append((keys.config("PeerAuthentication", ns, "default"), pa))
    kvs = [KeyValue(k, codec.encode(d), rev, rev, 1) for rev, (k, d) in enumerate(docs, start=1)]
    return kvs, len(kvs)


# CPU time of this process, not wall time: on a shared machine the wall clock mostly measures
# the other jobs (a run here got ~1/3 of a core); the figures are what the work itself costs.
_clock = time.process_time


def _ms(samples: list[float], q: float) -> float:
    """The q-quantile of `samples` (seconds) in ms; q=0.5 is the median."""
    if q == 0.5:
        return statistics.median(samples) * 1000
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def retained_bytes(
    services: int,
    per_service: int,
    namespaces: int,
    nodes: int,
    policies: bool,
    looked_up: bool = False,
) -> int:
    """Bytes still allocated after a full build once the listing itself is dropped: what an
    agent keeps (the builder's maps, the snapshot, and the documents where the builder keeps
    them). Measured in a fresh interpreter: an earlier build in this process would otherwise
    lend it what the converter shares by content (label maps, interned strings), uncounted.
    With `looked_up`, after every service port's endpoints were looked up once."""
    code = "import sys; from nodeagent.bench import snapshot as s; s._retained_child(sys.argv[1:])"
    argv = [services, per_service, namespaces, nodes, int(policies), int(looked_up)]
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)],
        cwd=Path(__file__).resolve().parents[2],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out)


def _retained_child(argv: list[str]) -> None:
    services, per_service, namespaces, nodes, policies, looked_up = map(int, argv)
    gc.collect()
    tracemalloc.start()
    kvs, revision = synthetic(services, per_service, namespaces, nodes, policies=bool(policies))
    builder = SnapshotBuilder.build(kvs, revision)
    del kvs
    if looked_up:
        snap = builder.snapshot
        for i in range(services):
            svc = snap.service(f"ns-{i % namespaces}", f"svc-{i}")
            assert svc is not None
            for port in svc.ports:
                snap.endpoints(svc, port.port)
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(current)


def measure(args: argparse.Namespace) -> Result:
    """This checkout's figures (the baseline subprocess runs this function too)."""
    result = Result(NAME, _parameters(args))
    stats = _timings(args, result)  # returns before memory is measured: its mesh is freed
    mesh = (args.services, args.per_service, args.namespaces, args.nodes, True)
    result.add(RETAINED, retained_bytes(*mesh) / 2**20, "MiB")
    result.add(RETAINED_IN_USE, retained_bytes(*mesh, looked_up=True) / 2**20, "MiB")
    # Bytes per resource, by difference on a mesh a tenth the size (no policies unless said).
    s = max(10, args.services // 10)
    per_ns = max(1, args.namespaces // 10)
    empty = retained_bytes(0, 0, per_ns, args.nodes, False)
    services = retained_bytes(s, 0, per_ns, args.nodes, False)
    with_workloads = retained_bytes(s, args.per_service, per_ns, args.nodes, False)
    with_policies = retained_bytes(s, 0, per_ns, args.nodes, True)
    result.add("bytes per Service (no endpoints)", (services - empty) / s, "B")
    result.add(
        "bytes per workload (before endpoint lookups)",
        (with_workloads - services) / (s * args.per_service),
        "B",
    )
    result.add(
        "bytes per VirtualService + DestinationRule pair (+ namespace policies)",
        (with_policies - services) / (s // 10),
        "B",
    )
    for name in ("workloads", "services", "virtual_services", "destination_rules", "endpoints"):
        result.add(f"count {name}", stats[name], "")
    return result


def _timings(args: argparse.Namespace, result: Result) -> dict[str, int]:
    kvs, revision = synthetic(args.services, args.per_service, args.namespaces, args.nodes)
    gc.collect()
    t0 = _clock()
    builder = SnapshotBuilder.build(kvs, revision)
    result.add("full build", (_clock() - t0) * 1000, "ms")
    stats = builder.snapshot.statistics()
    rev = revision

    def put(key: str, doc: object) -> Event:
        nonlocal rev
        rev += 1
        return Event("put", KeyValue(key, codec.encode(doc), rev, rev, 1))

    def sample(make: Callable[[int], Event]) -> list[float]:
        out = []
        for n in range(args.repeat):
            event = make(n)
            t = _clock()
            builder.apply([event])
            out.append(_clock() - t)
        return out

    mid = args.services // 2

    def workload_change(n: int) -> Event:
        # a different workload each time (no warm path), its label flipping: the services
        # selecting it recompute their endpoints
        i = (mid + n) % args.services
        doc = workload_doc(i, 0, args.per_service, args.namespaces, args.nodes)
        doc["metadata"]["labels"]["version"] = f"v{n % 2 + 2}"  # type: ignore[index]
        node = doc["spec"]["node"]  # type: ignore[index]
        return put(keys.workload(node, f"uid-{i * args.per_service}"), doc)

    def vs_change(n: int) -> Event:
        return put(
            keys.config("VirtualService", "ns-0", "svc-0"),
            virtual_service_doc(0, args.namespaces, weight=80 + n % 20),
        )

    def service_change(n: int) -> Event:
        doc = service_doc(mid, args.namespaces)
        doc["spec"]["ports"][0]["targetPort"] = 8080 + n % 2  # type: ignore[index]
        return put(keys.config("Service", f"ns-{mid % args.namespaces}", f"svc-{mid}"), doc)

    for label, make in (
        ("workload", workload_change),
        ("VirtualService", vs_change),
        ("Service", service_change),
    ):
        samples = sample(make)
        result.add(f"apply 1 {label} update (median)", _ms(samples, 0.5), "ms")
        result.add(f"apply 1 {label} update (p99)", _ms(samples, 0.99), "ms")

    # A node pool scaling up: `burst` new workloads of existing services, as one coalesced
    # batch (what the agent's sync applies) and, for comparison, one event at a time.
    def registrations(base: int) -> list[Event]:
        out = []
        for n in range(args.burst):
            i = n * 7 % args.services
            doc = workload_doc(i, base + n, args.per_service, args.namespaces, args.nodes)
            doc["metadata"]["uid"] = uid = f"burst-{base + n}"  # type: ignore[index]
            doc["spec"]["addresses"] = [_ip(0x0B000000, base + n)]  # type: ignore[index]
            out.append(put(keys.workload(f"node-{n % args.nodes}", uid), doc))
        return out

    batch = registrations(0)
    t = _clock()
    builder.apply(batch)
    result.add(
        "apply burst of workload registrations (one batch)",
        _ms([_clock() - t], 0.5),
        "ms",
    )
    one_by_one = registrations(args.burst)
    t = _clock()
    for event in one_by_one:
        builder.apply([event])
    result.add(
        "apply burst of workload registrations (one by one)",
        _ms([_clock() - t], 0.5),
        "ms",
    )

    snap = builder.snapshot
    svc = snap.service(f"ns-{mid % args.namespaces}", f"svc-{mid}")
    assert svc is not None
    vip = svc.addresses[0]
    lookups = 100_000
    t = _clock()
    for _ in range(lookups):
        snap.find_address(vip, 80)
    result.add("find_address(VIP, port)", (_clock() - t) / lookups * 1e9, "ns")
    host = svc.hostname
    t = _clock()
    for _ in range(lookups):
        snap.routes_for(host)
    result.add("routes_for(host)", (_clock() - t) / lookups * 1e9, "ns")
    return stats


def _parameters(args: argparse.Namespace) -> dict[str, object]:
    return {
        "services": args.services,
        "workloads": args.services * args.per_service,
        "namespaces": args.namespaces,
        "nodes": args.nodes,
        "burst": args.burst,
    }


def _measure_baseline(args: argparse.Namespace) -> Result:
    """This file's `measure` run against revision `args.baseline` in a temporary worktree."""
    repo = Path(__file__).resolve().parents[2]
    tmp = Path(tempfile.mkdtemp(prefix="bench-snapshot-baseline-"))
    tree = tmp / "tree"
    try:
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), args.baseline],
            check=True,
            capture_output=True,
        )
        shutil.copy(__file__, tree / "nodeagent" / "bench" / "snapshot.py")
        argv = [
            "--services", str(args.services), "--per-service", str(args.per_service),
            "--namespaces", str(args.namespaces), "--nodes", str(args.nodes),
            "--repeat", str(args.repeat), "--burst", str(args.burst),
        ]  # fmt: skip
        code = "import sys; from nodeagent.bench import snapshot as s; s._child(sys.argv[1:])"
        out = subprocess.run(
            [sys.executable, "-c", code, *argv],
            cwd=tree,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"baseline {args.baseline}: {exc.cmd[:4]} failed: {exc.stderr}") from None
    finally:
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
    doc = json.loads(out)
    result = Result(NAME, doc["parameters"])
    for f in doc["figures"]:
        result.add(f["metric"], f["value"], f["unit"])
    return result


def _child(argv: list[str]) -> None:
    """Entry point of the baseline subprocess: measure, print JSON."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    json.dump(measure(parser.parse_args(argv)).to_json(), sys.stdout)


def run(args: argparse.Namespace) -> Result:
    baseline = None if args.baseline == "none" else _measure_baseline(args)
    result = measure(args)
    before = {f.metric: f.value for f in baseline.figures} if baseline else {}
    for f in result.figures:
        target = TARGETS.get(f.metric)
        row: dict[str, object] = {"metric": f.metric, "unit": f.unit}
        if baseline is not None:
            row[f"baseline {args.baseline}"] = before.get(f.metric, "n/a")
        row["now"] = f.value
        if target is not None:
            row["target ≤"] = target
            row["met"] = "yes" if f.value <= target else "NO"
        result.rows.append(row)
    result.meta["baseline"] = args.baseline
    result.notes.append(
        "times are CPU time of the bench process (the machine is shared with other jobs, so "
        "wall time is noisier still); memory by tracemalloc (Python allocations only) in a "
        "fresh interpreter per figure, counting the raw documents where the builder keeps "
        "them; endpoint lists are built on first lookup (issue 22), hence the second figure"
    )
    return result
