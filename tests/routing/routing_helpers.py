"""Snapshots for the routing tests, built from Istio YAML and hand-made services/workloads."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import snapshot_docs
import yaml
from snapshot_docs import service, snapshot_of

from nodeagent.snapshot import Snapshot

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
_uids = itertools.count(1)
__all__ = ["bookinfo_base", "build", "corpus", "service", "workload"]


def corpus(*relative: str) -> list[dict[str, Any]]:
    if not CORPUS.is_dir():
        raise AssertionError(f"corpus missing at {CORPUS}")
    out: list[dict[str, Any]] = []
    for rel in relative:
        with (CORPUS / rel).open() as f:
            out.extend(d for d in yaml.safe_load_all(f) if d)
    return out


def workload(
    ip: str, labels: dict[str, str], *, namespace: str = "default", node: str = "node-1"
) -> dict[str, Any]:
    """A Workload at `ip` with a fresh uid."""
    return snapshot_docs.workload(f"uid-{next(_uids)}", ip, labels, namespace=namespace, node=node)


def build(*docs: dict[str, Any]) -> Snapshot:
    """A snapshot of `docs` (Istio config, Services and Workloads), namespace default if unset."""
    return snapshot_of(docs)


def bookinfo_base() -> list[dict[str, Any]]:
    """Bookinfo's services (port 9080) and one workload per version, plus all its subsets."""
    docs: list[dict[str, Any]] = []
    n = 10
    for app, versions in (
        ("productpage", ["v1"]),
        ("details", ["v1", "v2"]),
        ("reviews", ["v1", "v2", "v3"]),
        ("ratings", ["v1", "v2"]),
    ):
        docs.append(service(app, port=9080, target=9080))
        for v in versions:
            n += 1
            docs.append(workload(f"10.1.0.{n}", {"app": app, "version": v}))
    docs.extend(corpus("istio/bookinfo-networking/destination-rule-all.yaml"))
    return docs
