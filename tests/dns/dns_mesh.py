"""Test helpers: a small mesh snapshot built from store documents, as the agent would see it."""

from __future__ import annotations

from typing import Any

from snapshot_docs import service, snapshot_of, workload

from nodeagent.snapshot import Snapshot
from nodeagent.store import keys

REVIEWS_VIP = "10.96.0.10"
OTHER_REVIEWS_VIP = "10.96.0.20"
DB_PODS = ("10.1.1.1", "10.1.1.2")
PENDING_POD = "10.1.2.1"
API_VIP = "240.0.0.1"
WILD_VIP = "240.0.0.2"


def _entry(name: str, namespace: str, hosts: list[str], addresses: list[str]) -> tuple[str, Any]:
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hosts": hosts, "addresses": addresses, "resolution": "DNS",
                 "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]},
    }  # fmt: skip
    return keys.config("ServiceEntry", namespace, name), doc


def mesh_documents() -> list[Any]:
    return [
        workload("r1", "10.1.0.1", {"app": "reviews"}, namespace="default"),
        service("reviews", {"app": "reviews"}, namespace="default", cluster_ip=REVIEWS_VIP),
        service("reviews", {"app": "reviews"}, namespace="other", cluster_ip=OTHER_REVIEWS_VIP),
        # Headless, with two pods.
        workload("d1", DB_PODS[0], {"app": "db"}, namespace="data"),
        workload("d2", DB_PODS[1], {"app": "db"}, namespace="data"),
        service("db", {"app": "db"}, namespace="data", cluster_ip="None"),
        # A Kubernetes Service without a cluster IP yet: answered with its pods too.
        workload("p1", PENDING_POD, {"app": "pending"}, namespace="default"),
        service("pending", {"app": "pending"}, namespace="default"),
        # Headless without any pod: the name exists, no addresses.
        service("empty", {"app": "nobody"}, namespace="default", cluster_ip="None"),
        _entry("api", "default", ["api.example.com"], [API_VIP]),
        _entry("wild", "default", ["*.wild.example.org"], [WILD_VIP]),
        # No address: the real DNS knows this one, forward it.
        _entry("noaddr", "default", ["noaddr.example.net"], []),
    ]


def mesh_snapshot() -> Snapshot:
    return snapshot_of(mesh_documents())
