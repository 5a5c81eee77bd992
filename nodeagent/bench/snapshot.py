"""Snapshot bench: build a large synthetic mesh, then measure single changes and lookups.

The mesh is synthetic but shaped like a real one: services spread over namespaces, each with a
selector, two ports (one named targetPort) and `per_service` workloads over `nodes` nodes; every
10th service has a VirtualService splitting between two subsets and a DestinationRule; each
namespace has an AuthorizationPolicy and a PeerAuthentication.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable

from nodeagent.bench import Result
from nodeagent.snapshot import SnapshotBuilder
from nodeagent.store import codec, keys
from nodeagent.store.base import Event, KeyValue

NAME = "snapshot"
HELP = "full build, one-change updates, lookups and memory of the agent snapshot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--per-service", type=int, default=5, help="workloads per service")
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=50, help="samples per update figure")


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
    services: int, per_service: int, namespaces: int, nodes: int
) -> tuple[list[KeyValue], int]:
    """The store's documents for a synthetic mesh, as a listing: (kvs, revision)."""
    docs: list[tuple[str, object]] = []
    for i in range(services):
        ns = f"ns-{i % namespaces}"
        docs.append((keys.config("Service", ns, f"svc-{i}"), service_doc(i, namespaces)))
        for j in range(per_service):
            wl = workload_doc(i, j, per_service, namespaces, nodes)
            node = wl["spec"]["node"]  # type: ignore[index]
            docs.append((keys.workload(node, f"uid-{i * per_service + j}"), wl))
        if i % 10 == 0:
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
    for n in range(namespaces):
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


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def run(args: argparse.Namespace) -> Result:
    result = Result(
        NAME,
        {
            "services": args.services,
            "workloads": args.services * args.per_service,
            "namespaces": args.namespaces,
            "nodes": args.nodes,
        },
    )
    kvs, revision = synthetic(args.services, args.per_service, args.namespaces, args.nodes)
    gc.collect()
    t0 = time.perf_counter()
    builder = SnapshotBuilder.build(kvs, revision)
    result.add("full build", (time.perf_counter() - t0) * 1000, "ms")
    snap = builder.snapshot
    stats = snap.statistics()

    rev = revision

    def put(key: str, doc: object) -> Event:
        nonlocal rev
        rev += 1
        return Event("put", KeyValue(key, codec.encode(doc), 1, rev, 2))

    def sample(make: Callable[[int], Event]) -> list[float]:
        out = []
        for n in range(args.repeat):
            event = make(n)
            t = time.perf_counter()
            builder.apply([event])
            out.append(time.perf_counter() - t)
        return out

    mid = args.services // 2

    def workload_change(n: int) -> Event:
        doc = workload_doc(mid, 0, args.per_service, args.namespaces, args.nodes)
        doc["metadata"]["labels"]["version"] = f"v{n % 2 + 1}"  # type: ignore[index]
        node = doc["spec"]["node"]  # type: ignore[index]
        return put(keys.workload(node, f"uid-{mid * args.per_service}"), doc)

    def vs_change(n: int) -> Event:
        return put(
            keys.config("VirtualService", f"ns-{0}", "svc-0"),
            virtual_service_doc(0, args.namespaces, weight=80 + n % 20),
        )

    def service_change(n: int) -> Event:
        doc = service_doc(mid, args.namespaces)
        doc["spec"]["ports"][0]["targetPort"] = 8080 + n % 2  # type: ignore[index]
        return put(keys.config("Service", f"ns-{mid % args.namespaces}", f"svc-{mid}"), doc)

    result.add("apply 1 workload update (median)", _median_ms(sample(workload_change)), "ms")
    result.add("apply 1 VirtualService update (median)", _median_ms(sample(vs_change)), "ms")
    result.add("apply 1 Service update (median)", _median_ms(sample(service_change)), "ms")

    snap = builder.snapshot
    svc = snap.service(f"ns-{mid % args.namespaces}", f"svc-{mid}")
    assert svc is not None
    vip = svc.addresses[0]
    lookups = 100_000
    t = time.perf_counter()
    for _ in range(lookups):
        snap.find_address(vip, 80)
    result.add("find_address(VIP, port)", (time.perf_counter() - t) / lookups * 1e9, "ns")
    host = svc.hostname
    t = time.perf_counter()
    for _ in range(lookups):
        snap.routes_for(host)
    result.add("routes_for(host)", (time.perf_counter() - t) / lookups * 1e9, "ns")

    builder = snap = None  # type: ignore[assignment]
    gc.collect()
    tracemalloc.start()
    retained = SnapshotBuilder.build(kvs, revision)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del retained
    result.add("memory retained by builder+snapshot", current / 2**20, "MiB")
    result.add("memory peak during full build", peak / 2**20, "MiB")
    for name in ("workloads", "services", "virtual_services", "destination_rules", "endpoints"):
        result.add(f"count {name}", stats[name], "")
    return result
