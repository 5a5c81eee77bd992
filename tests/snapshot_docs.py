"""Test documents and a real `Snapshot` built from them, the way the agent does from the store:
the one place tests make `Service`, `Workload` and `EndpointSlice` documents."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nodeagent.kube.mirror import convert
from nodeagent.kube.resources import ENDPOINT_SLICE
from nodeagent.snapshot import Snapshot, SnapshotBuilder
from nodeagent.store import codec, keys
from nodeagent.store.base import KeyValue

Doc = dict[str, Any]
_BY_NAME: Any = object()  # `service`'s default selector: app=<name>


def workload(
    uid: str,
    ip: str | None,
    labels: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
    namespace: str = "default",
    node: str = "node-1",
    sa: str = "default",
    ports: list[dict[str, Any]] | None = None,
) -> Doc:
    """A Workload (a pod the agent registered) with address `ip` (None: none yet), named
    `pod-<uid>` unless `name` says otherwise."""
    doc: Doc = {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {
            "name": name or f"pod-{uid}",
            "namespace": namespace,
            "uid": uid,
            "labels": dict(labels or {}),
            "annotations": {},
        },
        "spec": {"node": node, "addresses": [ip] if ip else [], "serviceAccount": sa},
    }
    if ports is not None:
        doc["spec"]["ports"] = ports
    return doc


def service(
    name: str,
    selector: Mapping[str, str] | None = _BY_NAME,
    *,
    namespace: str = "default",
    cluster_ip: str | None = None,
    port: int = 80,
    target: int = 8080,
    port_name: str = "http",
    ports: list[dict[str, Any]] | None = None,
) -> Doc:
    """A Service selecting `app=<name>` (or `selector`; None: no selector) with one port
    (`port_name` `port` → `target`), or `ports`."""
    spec: Doc = {"ports": ports or [{"name": port_name, "port": port, "targetPort": target}]}
    if selector is _BY_NAME:
        selector = {"app": name}
    if selector is not None:
        spec["selector"] = dict(selector)
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def endpoint_slice(
    name: str,
    service: str | None,
    endpoints: Iterable[str | tuple[str, Mapping[str, bool]]],
    *,
    namespace: str = "default",
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> Doc:
    """A Kubernetes EndpointSlice (discovery.k8s.io/v1) labelled for `service` (None: no
    label), one endpoint per address (or (address, conditions); none given: Kubernetes' unset
    conditions), with `ports` (default one `http` port 8080)."""
    labels = {} if service is None else {"kubernetes.io/service-name": service}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "addressType": address_type,
        "endpoints": [
            {"addresses": [e]}
            if isinstance(e, str)
            else {"addresses": [e[0]], "conditions": dict(e[1])}
            for e in endpoints
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}] if ports is None else ports,
    }


def destination_rule(host: str, spec: Doc, *, namespace: str = "default") -> Doc:
    """An Istio DestinationRule named after `host`, with `spec` (trafficPolicy, subsets, …)."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": namespace},
        "spec": {"host": host, **spec},
    }


def mirrored(obj: Doc) -> tuple[str, Doc]:
    """(store key, document) of a Kubernetes EndpointSlice as kube-sync writes it (its own
    conversion, `nodeagent.kube.mirror.convert`)."""
    m = convert(ENDPOINT_SLICE, obj)
    return m.key, m.body


def key_of(doc: Doc) -> str:
    """The store key of a document: Workloads live under their node, the rest under their kind
    (namespace `default` when the document names none)."""
    meta = doc.setdefault("metadata", {})
    if doc["kind"] == "Workload":
        return keys.workload(doc["spec"]["node"], meta["uid"])
    return keys.config(doc["kind"], meta.setdefault("namespace", "default"), meta["name"])


def snapshot_of(docs: Iterable[Doc | tuple[str, Doc]], **options: Any) -> Snapshot:
    """A snapshot of `docs` (documents, or (key, document) pairs), one revision each; fails the
    test if the builder skipped any (a test document that does not convert is a test bug)."""
    pairs = [d if isinstance(d, tuple) else (key_of(d), d) for d in docs]
    kvs = [KeyValue(k, codec.encode(d), i, i, 1) for i, (k, d) in enumerate(pairs, start=1)]
    builder = SnapshotBuilder.build(kvs, len(kvs), **options)
    assert not builder.skipped(), f"documents skipped: {dict(builder.skipped())}"
    return builder.snapshot
