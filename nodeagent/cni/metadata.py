"""Where the agent learns a pod's labels, annotations and service account.

`PodMetadataSource` is the seam. `RuntimeArgsMetadataSource` reads what the sandbox's runtime
passes in CNI_ARGS (`MESH_POD_META`). `StoreMetadataSource` is the Kubernetes one: it reads the
Pod that `nodeagent kube-sync` mirrored into the store (`/mesh/v1/kube/pods/<ns>/<name>`) and,
when the CNI ADD races ahead of kube-sync, watches for it with a bounded wait. A mirrored Pod
whose uid differs from the CNI call's `K8S_POD_UID` is an older pod of the same name: it is
waited past, never used. A pod the runtime did not name (no `K8S_POD_NAME` in CNI_ARGS: mesh-cni's
`unnamedPods`, e.g. `ctr run --cni`) has no Pod object to wait for: it gets the defaults (no
labels, service account `default`). `metadata_source(kind, store)` picks one by name
(`MESH_POD_METADATA`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from nodeagent.cni.errors import EnrollError, ErrorCode
from nodeagent.cni.protocol import CniRequest
from nodeagent.log import get_logger
from nodeagent.store import codec, keys
from nodeagent.store.base import CompactedError, KeyValue, Store, StoreError

log = get_logger("cni.metadata")

META_ARG = "MESH_POD_META"
# Set by Kubernetes runtimes (CRI); absent when mesh-cni named the pod itself (`unnamedPods`).
POD_NAME_ARG = "K8S_POD_NAME"
DEFAULT_SERVICE_ACCOUNT = "default"
# A Kubernetes object's labels + annotations are limited to 256 KiB; allow the encoding's growth.
_MAX_META_ARG = 512 * 1024
# b64decode silently drops characters outside the alphabet; CNI_ARGS must not be guessed at.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


@dataclass(frozen=True, slots=True)
class PodMetadata:
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    service_account: str = DEFAULT_SERVICE_ACCOUNT


class PodMetadataSource(Protocol):
    async def lookup(self, req: CniRequest) -> PodMetadata: ...


def _bad(why: str) -> EnrollError:
    return EnrollError(ErrorCode.INVALID_ENV, f"invalid CNI_ARGS {META_ARG}: {why}")


def _str_map(doc: Mapping[str, object], key: str) -> dict[str, str]:
    value = doc.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _bad(f"{key!r} must be a JSON object of strings to strings")
    return dict(value)


def parse_pod_meta(raw: str) -> PodMetadata:
    """Decode `base64url(JSON {"labels", "annotations", "serviceAccount"})`, padding optional."""
    if len(raw) > _MAX_META_ARG:
        raise _bad(f"{len(raw)} characters, more than {_MAX_META_ARG}")
    if not _BASE64URL.fullmatch(raw):
        raise _bad("not base64url: only A-Z a-z 0-9 - _ and trailing '=' are allowed")
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"not base64url: {exc}") from None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"not JSON after base64url decoding: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad(f"expected a JSON object, got {type(doc).__name__}")
    sa = doc.get("serviceAccount", DEFAULT_SERVICE_ACCOUNT)
    if sa is None:
        sa = DEFAULT_SERVICE_ACCOUNT
    # Service accounts are DNS-1123 subdomains; '/' would forge a different SPIFFE path.
    if not isinstance(sa, str) or not sa or len(sa) > 253 or "/" in sa:
        raise _bad(f"'serviceAccount' must be a non-empty name without '/', got {sa!r}")
    return PodMetadata(
        labels=_str_map(doc, "labels"),
        annotations=_str_map(doc, "annotations"),
        service_account=sa,
    )


class RuntimeArgsMetadataSource:
    """The sandbox's source: metadata travels with the CNI call in CNI_ARGS."""

    async def lookup(self, req: CniRequest) -> PodMetadata:
        raw = req.args.get(META_ARG)
        if raw is None or raw == "":
            return PodMetadata()
        return parse_pod_meta(raw)


ENV_SOURCE = "MESH_POD_METADATA"
DEFAULT_WAIT = 10.0


def _pod_metadata(key: str, doc: Any) -> PodMetadata:
    def bad(why: str) -> EnrollError:
        return EnrollError(ErrorCode.ENROLL_FAILED, f"pod record {key} in the store: {why}")

    if not isinstance(doc, dict):
        raise bad("not a map")
    out: dict[str, dict[str, str]] = {}
    for name in ("labels", "annotations"):
        value = doc.get(name) or {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise bad(f"{name!r} is not a map of strings")
        out[name] = dict(value)
    sa = doc.get("serviceAccount") or DEFAULT_SERVICE_ACCOUNT
    if not isinstance(sa, str) or len(sa) > 253 or "/" in sa:
        raise bad(f"bad serviceAccount {sa!r}")
    return PodMetadata(labels=out["labels"], annotations=out["annotations"], service_account=sa)


class StoreMetadataSource:
    """Kubernetes pods, as kube-sync mirrors them into the store; waits at most `wait` s."""

    def __init__(self, store: Store, *, wait: float = DEFAULT_WAIT) -> None:
        self.store = store
        self.wait = wait

    def _match(self, kv: KeyValue | None, uid: str) -> PodMetadata | None:
        if kv is None or not kv.value:
            return None
        try:
            doc = codec.decode(kv)
        except codec.DecodeError as exc:
            raise EnrollError(ErrorCode.ENROLL_FAILED, str(exc)) from None
        if uid and isinstance(doc, dict) and doc.get("uid") != uid:
            return None  # a previous pod of the same name; kube-sync has not seen ours yet
        return _pod_metadata(kv.key, doc)

    async def lookup(self, req: CniRequest) -> PodMetadata:
        if not req.args.get(POD_NAME_ARG):
            return PodMetadata()  # not a Kubernetes pod: kube-sync has nothing to mirror
        ns, name, uid = req.pod.namespace, req.pod.name, req.pod.uid
        if not ns or not name or "/" in ns or "/" in name:
            raise EnrollError(ErrorCode.INVALID_ENV, f"no usable pod name in CNI_ARGS: {ns}/{name}")
        key = keys.kube_pod(ns, name)
        with trio.move_on_after(self.wait):
            try:
                return await self._wait_for(key, uid)
            except StoreError as exc:
                raise EnrollError(
                    ErrorCode.TRY_AGAIN_LATER, f"look up pod {ns}/{name} in the store: {exc}"
                ) from None
        raise EnrollError(
            ErrorCode.TRY_AGAIN_LATER,
            f"pod {ns}/{name} (uid {uid or '?'}) not in the store after {self.wait:g}s",
            "kube-sync mirrors Pods into the store; is it running and leading?",
        )

    async def _wait_for(self, key: str, uid: str) -> PodMetadata:
        for _attempt in range(100):  # a compacted watch re-reads; bounded anyway by `wait`
            kvs, revision = await self.store.range(key)
            found = self._match(next((kv for kv in kvs if kv.key == key), None), uid)
            if found is not None:
                return found
            log.info("cni.metadata.waiting", key=key, uid=uid)
            try:
                async with self.store.watch(key, start_revision=revision + 1) as batches:
                    async for batch in batches:
                        for event in batch:
                            if event.kv.key != key or event.type != "put":
                                continue
                            found = self._match(event.kv, uid)
                            if found is not None:
                                return found
            except CompactedError:
                continue
        raise StoreError(f"watch on {key} kept being compacted")


def metadata_source(kind: str, store: Store | None = None) -> PodMetadataSource:
    """`runtime-args` (the sandbox) or `kubernetes` (kube-sync's Pods in `store`)."""
    if kind in ("", "runtime-args"):
        return RuntimeArgsMetadataSource()
    if kind == "kubernetes":
        if store is None:
            raise ValueError("the kubernetes pod metadata source needs the store")
        return StoreMetadataSource(store)
    raise ValueError(f"{ENV_SOURCE}={kind!r}: expected 'runtime-args' or 'kubernetes'")
