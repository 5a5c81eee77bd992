"""Kubernetes objects → store documents (pure `convert`), and the writer that mirrors them.

Services and Istio kinds go through the very validation `meshctl apply` uses
(`config.batch.validate_document`), after the server-owned metadata (uid, resourceVersion,
managedFields, ownerReferences, …) and `status` are dropped: a bad object is rejected alone,
logged with its kind, namespace/name and every field error, and never reaches the store. What
kube-sync writes under config/ carries the annotation `OWNER_ANNOTATION`, so a re-list deletes
only documents kube-sync wrote (not ones applied with meshctl). Pods and EndpointSlices are
reduced to what the mesh reads and live under `/mesh/v1/kube/` (see `resources`).

Kubernetes owns Service clusterIPs: a mirrored Service claims its VIP key (`keys.vip`) in the
same transaction as the document, overwriting any other claim (logged).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.config.batch import validate_document
from nodeagent.config.documents import RawDocument
from nodeagent.config.errors import Source
from nodeagent.config.validate.common import dns1123_label, dns1123_subdomain
from nodeagent.kube.resources import ResourceType
from nodeagent.log import get_logger
from nodeagent.store import keys
from nodeagent.store.base import Compare, Delete, KeyValue, Op, Put, Store
from nodeagent.store.codec import DecodeError, decode, encode

log = get_logger("kube.mirror")

OWNER_ANNOTATION = "mesh.nodeagent.io/source"
OWNER_VALUE = "kubernetes"
# Big, and a copy of what we already store.
_DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
MAX_ADDRESSES = 1000


@dataclass(frozen=True, slots=True)
class Mirrored:
    """What one Kubernetes object becomes: a store key and its value (a msgpack-able map)."""

    key: str
    body: dict[str, Any]
    vip: str | None = None  # a Service's clusterIP, claimed alongside


class Rejected(Exception):
    """The object does not validate; `errors` are the field errors, `ref` names the object."""

    def __init__(self, ref: str, errors: list[str]) -> None:
        super().__init__(f"{ref}: " + "; ".join(errors))
        self.ref = ref
        self.errors = errors


def object_ref(rtype: ResourceType, obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    return f"{rtype.kind} {meta.get('namespace', '?')}/{meta.get('name', '?')}"


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _annotations(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    value = meta.get("annotations")
    if not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if k not in _DROPPED_ANNOTATIONS}


def key_of(rtype: ResourceType, obj: Mapping[str, Any]) -> str | None:
    """The store key an object maps to, from its metadata alone (for deletes)."""
    meta = _meta(obj)
    ns, name = meta.get("namespace"), meta.get("name")
    if not isinstance(ns, str) or not isinstance(name, str) or not ns or not name:
        return None
    if "/" in ns or "/" in name:
        return None
    if rtype.kind == "Pod":
        return keys.kube_pod(ns, name)
    if rtype.kind == "EndpointSlice":
        return keys.endpoint_slice(ns, name)
    return keys.config(rtype.kind, ns, name)


def convert(rtype: ResourceType, obj: Mapping[str, Any]) -> Mirrored:
    """Validate and convert one object; Rejected names every problem."""
    if rtype.kind == "Pod":
        return _pod(rtype, obj)
    if rtype.kind == "EndpointSlice":
        return _endpoint_slice(rtype, obj)
    return _config(rtype, obj)


def _config(rtype: ResourceType, obj: Mapping[str, Any]) -> Mirrored:
    meta = _meta(obj)
    slim_meta: dict[str, Any] = {
        k: meta[k] for k in ("name", "namespace", "labels") if meta.get(k) is not None
    }
    annotations = _annotations(meta)
    if annotations:
        slim_meta["annotations"] = annotations
    raw = {
        "apiVersion": obj.get("apiVersion", rtype.api_version),
        "kind": rtype.kind,
        "metadata": slim_meta,
        "spec": obj.get("spec"),
    }
    ref = object_ref(rtype, obj)
    result = validate_document(RawDocument(Source(f"kubernetes:{ref}"), raw), "default")
    if isinstance(result, list):
        raise Rejected(ref, [str(e.error) for e in result])
    body = dict(result.body)
    body["metadata"] = {
        **body["metadata"],
        "annotations": {**body["metadata"].get("annotations", {}), OWNER_ANNOTATION: OWNER_VALUE},
    }
    vip = None
    if rtype.kind == "Service":
        ip = body["spec"].get("clusterIP")
        if isinstance(ip, str) and ip != "None":
            vip = ip
    return Mirrored(result.key, body, vip)


def _name(ref: str, path: str, value: Any, check: Any, errors: list[str]) -> str:
    if not isinstance(value, str) or not value:
        errors.append(f"{path}: Required value")
        return ""
    problem = check(value)
    if problem:
        errors.append(f"{path}: {problem}")
    return value


def _str_map(path: str, value: Any, errors: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        errors.append(f"{path}: must be a map of strings to strings")
        return {}
    return dict(value)


def _ipv4(path: str, value: Any, errors: list[str]) -> str | None:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ValueError, TypeError):
        errors.append(f"{path}: {value!r} is not an IPv4 address")
        return None


def _pod(rtype: ResourceType, obj: Mapping[str, Any]) -> Mirrored:
    ref = object_ref(rtype, obj)
    meta = _meta(obj)
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    assert isinstance(spec, dict)
    assert isinstance(status, dict)
    errors: list[str] = []
    ns = _name(ref, "metadata.namespace", meta.get("namespace"), dns1123_label, errors)
    name = _name(ref, "metadata.name", meta.get("name"), dns1123_subdomain, errors)
    uid = meta.get("uid")
    if not isinstance(uid, str) or not uid:
        errors.append("metadata.uid: Required value")
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    _name(ref, "spec.serviceAccountName", sa, dns1123_subdomain, errors)
    node = spec.get("nodeName") or ""
    if node:
        _name(ref, "spec.nodeName", node, dns1123_subdomain, errors)
    ips: list[str] = []
    for i, entry in enumerate((status.get("podIPs") or [])[:16]):
        ip = entry.get("ip") if isinstance(entry, dict) else None
        try:
            ips.append(str(ipaddress.ip_address(str(ip))))
        except (ValueError, TypeError):
            errors.append(f"status.podIPs[{i}].ip: {ip!r} is not an IP address")
    labels = _str_map("metadata.labels", meta.get("labels"), errors)
    annotations = _str_map("metadata.annotations", _annotations(meta), errors)
    if errors:
        raise Rejected(ref, errors)
    body = {
        "namespace": ns,
        "name": name,
        "uid": uid,
        "labels": labels,
        "annotations": annotations,
        "serviceAccount": sa,
        "node": node,
        "podIPs": ips,
        "hostNetwork": bool(spec.get("hostNetwork")),
    }
    return Mirrored(keys.kube_pod(ns, name), body)


def _endpoint_slice(rtype: ResourceType, obj: Mapping[str, Any]) -> Mirrored:
    ref = object_ref(rtype, obj)
    meta = _meta(obj)
    errors: list[str] = []
    ns = _name(ref, "metadata.namespace", meta.get("namespace"), dns1123_label, errors)
    name = _name(ref, "metadata.name", meta.get("name"), dns1123_subdomain, errors)
    labels = _str_map("metadata.labels", meta.get("labels"), errors)
    service = labels.get("kubernetes.io/service-name", "")
    if obj.get("addressType") != "IPv4":
        errors.append(f"addressType: {obj.get('addressType')!r} is not supported (only IPv4)")
    ports = []
    for i, p in enumerate(obj.get("ports") or []):
        if not isinstance(p, dict):
            errors.append(f"ports[{i}]: must be an object")
            continue
        port = p.get("port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            errors.append(f"ports[{i}].port: {port!r} is not a port number")
        ports.append(
            {
                k: p[k]
                for k in ("name", "port", "protocol", "appProtocol")
                if p.get(k) is not None and isinstance(p[k], str | int)
            }
        )
    endpoints = []
    raw_endpoints = obj.get("endpoints") or []
    if not isinstance(raw_endpoints, list) or len(raw_endpoints) > MAX_ADDRESSES:
        errors.append(f"endpoints: must be a list of at most {MAX_ADDRESSES}")
        raw_endpoints = []
    for i, e in enumerate(raw_endpoints):
        if not isinstance(e, dict):
            errors.append(f"endpoints[{i}]: must be an object")
            continue
        addresses = [
            a
            for j, raw in enumerate(e.get("addresses") or [])
            if (a := _ipv4(f"endpoints[{i}].addresses[{j}]", raw, errors)) is not None
        ]
        conditions = e.get("conditions") if isinstance(e.get("conditions"), dict) else {}
        assert isinstance(conditions, dict)
        target = e.get("targetRef") if isinstance(e.get("targetRef"), dict) else {}
        assert isinstance(target, dict)
        endpoints.append(
            {
                "addresses": addresses,
                # discovery.k8s.io/v1: an unset ready or serving means true, an unset
                # terminating false (kube-proxy reads them so).
                "ready": conditions.get("ready") is not False,
                "serving": conditions.get("serving") is not False,
                "terminating": conditions.get("terminating") is True,
                "node": e.get("nodeName") or "",
                "targetRef": {
                    k: target[k]
                    for k in ("kind", "namespace", "name", "uid")
                    if isinstance(target.get(k), str)
                },
            }
        )
    if errors:
        raise Rejected(ref, errors)
    body = {
        "namespace": ns,
        "name": name,
        "service": service,
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }
    return Mirrored(keys.endpoint_slice(ns, name), body)


# --- writing ------------------------------------------------------------------------------------


def _decoded(kv: KeyValue) -> Any:
    try:
        return decode(kv)
    except DecodeError:
        return None


def owned(rtype: ResourceType, body: Any) -> bool:
    """Whether kube-sync wrote this stored document (a re-list may delete it)."""
    if rtype.kind in ("Pod", "EndpointSlice"):
        return True
    if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
        return False
    annotations = body["metadata"].get("annotations")
    return isinstance(annotations, dict) and annotations.get(OWNER_ANNOTATION) == OWNER_VALUE


class Mirror:
    """Writes converted objects to the store; counts what it did for `statistics()`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.written = 0
        self.deleted = 0
        self.rejected = 0

    def statistics(self) -> dict[str, int]:
        return {"written": self.written, "deleted": self.deleted, "rejected": self.rejected}

    def _convert(self, rtype: ResourceType, obj: Mapping[str, Any]) -> Mirrored | None:
        try:
            return convert(rtype, obj)
        except Rejected as exc:
            self.rejected += 1
            log.warning(
                "kube.object.rejected",
                kind=rtype.kind,
                object=exc.ref.split(" ", 1)[1],
                errors=exc.errors,
            )
            return None

    async def _write(self, m: Mirrored, current: KeyValue | None) -> None:
        value = encode(m.body)
        if current is not None and current.value == value:
            return
        ops: list[Op] = [Put(m.key, value)]
        if m.vip is not None:
            owner = {
                "namespace": m.body["metadata"]["namespace"],
                "name": m.body["metadata"]["name"],
            }
            claim = await self.store.get(keys.vip(m.vip))
            if claim is None or _decoded(claim) != owner:
                if claim is not None:
                    log.warning(
                        "kube.vip.reclaimed",
                        vip=m.vip,
                        service=f"{owner['namespace']}/{owner['name']}",
                    )
                ops.append(Put(keys.vip(m.vip), encode(owner)))
        await self.store.txn([], ops)
        self.written += 1

    async def _delete(self, rtype: ResourceType, key: str, body: Any) -> None:
        ops: list[Op] = [Delete(key)]
        compares: list[Compare] = []
        if rtype.kind == "Service" and isinstance(body, dict):
            ip = (body.get("spec") or {}).get("clusterIP")
            meta = body.get("metadata") or {}
            if isinstance(ip, str) and ip != "None":
                claim = await self.store.get(keys.vip(ip))
                owner = {"namespace": meta.get("namespace"), "name": meta.get("name")}
                if claim is not None and _decoded(claim) == owner:
                    compares.append(Compare(claim.key, claim.mod_revision))
                    ops.append(Delete(claim.key))
        result = await self.store.txn(compares, ops)
        if not result.succeeded:
            await self.store.delete(key)  # the claim moved on; the document still goes
        self.deleted += 1

    async def upsert(self, rtype: ResourceType, obj: Mapping[str, Any]) -> None:
        """ADDED/MODIFIED. An object that no longer validates is removed from the store: the
        mesh must not keep acting on a version Kubernetes has replaced."""
        m = self._convert(rtype, obj)
        if m is None:
            key = key_of(rtype, obj)
            current = await self.store.get(key) if key else None
            if current is not None and owned(rtype, _decoded(current)):
                await self._delete(rtype, current.key, _decoded(current))
            return
        await self._write(m, await self.store.get(m.key))

    async def remove(self, rtype: ResourceType, obj: Mapping[str, Any]) -> None:
        """DELETED."""
        key = key_of(rtype, obj)
        if key is None:
            return
        current = await self.store.get(key)
        if current is not None and owned(rtype, _decoded(current)):
            await self._delete(rtype, key, _decoded(current))

    async def resync(self, rtype: ResourceType, objects: Iterable[Mapping[str, Any]]) -> None:
        """After a (re-)list: write what changed, delete what kube-sync wrote and is gone."""
        stored, _ = await self.store.range(rtype.store_prefix)
        by_key = {kv.key: kv for kv in stored}
        seen: set[str] = set()
        for obj in objects:
            m = self._convert(rtype, obj)
            if m is None:
                continue
            seen.add(m.key)
            await self._write(m, by_key.get(m.key))
        for kv in stored:
            if kv.key in seen:
                continue
            body = _decoded(kv)
            if owned(rtype, body):
                await self._delete(rtype, kv.key, body)
