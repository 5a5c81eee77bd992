"""Hand-made store documents for the snapshot tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nodeagent.store import codec, keys
from nodeagent.store.base import Event, KeyValue

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"


class Docs:
    """Builds KeyValues with increasing revisions, like a store would."""

    def __init__(self) -> None:
        self.revision = 0

    def kv(self, key: str, doc: Any) -> KeyValue:
        self.revision += 1
        value = doc if isinstance(doc, bytes) else codec.encode(doc)
        return KeyValue(key, value, self.revision, self.revision, 1)

    def put(self, key: str, doc: Any) -> Event:
        return Event("put", self.kv(key, doc))

    def delete(self, key: str) -> Event:
        self.revision += 1
        return Event("delete", KeyValue(key, b"", 0, self.revision, 0))

    def config(self, doc: dict[str, Any], namespace: str = "default") -> KeyValue:
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        return self.kv(keys.config(doc["kind"], meta["namespace"], meta["name"]), doc)


def workload(
    uid: str,
    ip: str,
    labels: dict[str, str],
    *,
    namespace: str = "default",
    node: str = "node-1",
    sa: str = "default",
    ports: list[dict[str, Any]] | None = None,
) -> tuple[str, dict[str, Any]]:
    doc: dict[str, Any] = {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {
            "name": f"pod-{uid}",
            "namespace": namespace,
            "uid": uid,
            "labels": labels,
            "annotations": {},
        },
        "spec": {"node": node, "addresses": [ip], "serviceAccount": sa},
    }
    if ports is not None:
        doc["spec"]["ports"] = ports
    return keys.workload(node, uid), doc


def service(
    name: str,
    selector: dict[str, str] | None,
    *,
    namespace: str = "default",
    cluster_ip: str | None = None,
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}],
    }
    if selector is not None:
        spec["selector"] = selector
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def corpus_docs(*relative: str) -> list[dict[str, Any]]:
    if not CORPUS.is_dir():
        raise AssertionError(f"corpus missing at {CORPUS}")
    out = []
    for rel in relative:
        with (CORPUS / rel).open() as f:
            out.extend(d for d in yaml.safe_load_all(f) if d)
    return out
