"""Hand-made store documents → a real Snapshot, for the proxy's decision tests."""

from __future__ import annotations

from typing import Any

from snapshot_docs import snapshot_of

from nodeagent.snapshot import Snapshot
from nodeagent.store import keys


def workload(
    uid: str,
    ip: str,
    *,
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    node: str = "node-1",
    sa: str = "default",
) -> tuple[str, dict[str, Any]]:
    doc = {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {
            "name": f"pod-{uid}",
            "namespace": namespace,
            "uid": uid,
            "labels": labels or {},
            "annotations": {},
        },
        "spec": {"node": node, "addresses": [ip], "serviceAccount": sa},
    }
    return keys.workload(node, uid), doc


def config(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> Any:
    api = "v1" if kind == "Service" else "networking.istio.io/v1"
    if kind in ("AuthorizationPolicy", "PeerAuthentication"):
        api = "security.istio.io/v1"
    doc = {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": namespace}}
    doc["spec"] = spec
    return keys.config(kind, namespace, name), doc


def snapshot(*docs: tuple[str, Any]) -> Snapshot:
    return snapshot_of(docs)
