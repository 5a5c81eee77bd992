"""Test helpers: a small mesh snapshot built from store documents, as the agent would see it."""

from __future__ import annotations

from typing import Any

from snapshot_docs import snapshot_of

from nodeagent.snapshot import Snapshot
from nodeagent.store import keys

REVIEWS_VIP = "10.96.0.10"
OTHER_REVIEWS_VIP = "10.96.0.20"
DB_PODS = ("10.1.1.1", "10.1.1.2")
PENDING_POD = "10.1.2.1"
API_VIP = "240.0.0.1"
WILD_VIP = "240.0.0.2"


def _workload(uid: str, ip: str, labels: dict[str, str], namespace: str) -> tuple[str, Any]:
    return keys.workload("node-1", uid), {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": f"pod-{uid}", "namespace": namespace, "uid": uid,
                     "labels": labels, "annotations": {}},
        "spec": {"node": "node-1", "addresses": [ip], "serviceAccount": "default"},
    }  # fmt: skip


def _service(name: str, namespace: str, selector: dict[str, str] | None,
             cluster_ip: str | None) -> tuple[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    if selector is not None:
        spec["selector"] = selector
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    doc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}  # fmt: skip
    return keys.config("Service", namespace, name), doc


def _entry(name: str, namespace: str, hosts: list[str], addresses: list[str]) -> tuple[str, Any]:
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hosts": hosts, "addresses": addresses, "resolution": "DNS",
                 "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]},
    }  # fmt: skip
    return keys.config("ServiceEntry", namespace, name), doc


def mesh_documents() -> list[tuple[str, Any]]:
    return [
        _workload("r1", "10.1.0.1", {"app": "reviews"}, "default"),
        _service("reviews", "default", {"app": "reviews"}, REVIEWS_VIP),
        _service("reviews", "other", {"app": "reviews"}, OTHER_REVIEWS_VIP),
        # Headless, with two pods.
        _workload("d1", DB_PODS[0], {"app": "db"}, "data"),
        _workload("d2", DB_PODS[1], {"app": "db"}, "data"),
        _service("db", "data", {"app": "db"}, "None"),
        # A Kubernetes Service without a cluster IP yet: answered with its pods too.
        _workload("p1", PENDING_POD, {"app": "pending"}, "default"),
        _service("pending", "default", {"app": "pending"}, None),
        # Headless without any pod: the name exists, no addresses.
        _service("empty", "default", {"app": "nobody"}, "None"),
        _entry("api", "default", ["api.example.com"], [API_VIP]),
        _entry("wild", "default", ["*.wild.example.org"], [WILD_VIP]),
        # No address: the real DNS knows this one, forward it.
        _entry("noaddr", "default", ["noaddr.example.net"], []),
    ]


def mesh_snapshot() -> Snapshot:
    return snapshot_of(mesh_documents())
