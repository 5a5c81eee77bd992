"""From raw YAML documents to normalized, validated ones (pure, no I/O).

`validate_batch` checks every document on its own (all errors of all documents are collected),
then `check_references` checks what one document says about another: a route's subset must be
defined by the DestinationRule for its host, when one is known (in the batch or in the store).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.config.documents import RawDocument
from nodeagent.config.errors import ConfigError, FieldError, Source
from nodeagent.config.kinds import KINDS, Kind, UnknownKind, resolve, store_key
from nodeagent.config.schema import Walker, string, type_name
from nodeagent.config.validate.common import (
    dns1123_label,
    dns1123_subdomain,
    fqdn,
    labels,
    metadata_annotations,
)
from nodeagent.config.validate.service import uid as check_uid
from nodeagent.store.codec import MAX_VALUE, encode

UNSUPPORTED_KINDS = (
    "WorkloadEntry",
    "WorkloadGroup",
    "Sidecar",
    "EnvoyFilter",
    "Telemetry",
    "ProxyConfig",
    "WasmPlugin",
)
# Fields the API server sets; dropped from user input (kubectl get -o yaml output re-applies).
_SERVER_METADATA = (
    "creationTimestamp",
    "resourceVersion",
    "uid",
    "managedFields",
    "generation",
    "selfLink",
)


@dataclass(frozen=True, slots=True)
class Document:
    """A validated, normalized document and its store key."""

    source: Source
    kind: str
    namespace: str
    name: str
    key: str
    body: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def _ref(data: Any, default_namespace: str, index: int) -> str:
    if isinstance(data, dict):
        kind = data.get("kind")
        meta = data.get("metadata")
        if isinstance(kind, str) and isinstance(meta, dict) and isinstance(meta.get("name"), str):
            ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
            return f"{kind} {ns or default_namespace}/{meta['name']}"
        if isinstance(kind, str):
            return f"{kind} (document {index + 1})"
    return f"document {index + 1}"


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _encodable(w: Walker, path: str, value: Any) -> None:
    """A last guard: only msgpack-safe types with string keys reach the store."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                w.error(path, f"key {k!r} must be a string")
            else:
                _encodable(w, f"{path}.{k}" if path else k, v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _encodable(w, f"{path}[{i}]", v)
    elif not isinstance(value, str | int | float | bool):
        w.error(path, f"unsupported value type {type_name(value)}")


def _metadata(w: Walker, meta: Any, kind: Kind, default_namespace: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(meta, dict):
        w.error("metadata", "Required value" if meta is None else "must be an object")
        return out
    for key in meta:
        if key in ("name", "namespace", "labels", "annotations"):
            continue
        if key == "uid" and kind.name == "Workload":
            continue
        if key in _SERVER_METADATA:
            continue
        w.unsupported(f"metadata.{key}")
    name = meta.get("name")
    if name is None:
        w.required("metadata.name")
    else:
        check = dns1123_label if kind.name == "Service" else dns1123_subdomain
        string(min_len=1, check=check)(w, "metadata.name", name)
        out["name"] = name
    namespace = meta.get("namespace")
    if namespace is None:
        namespace = default_namespace
    string(min_len=1, check=dns1123_label)(w, "metadata.namespace", namespace)
    out["namespace"] = namespace
    if meta.get("labels") is not None:
        labels(w, "metadata.labels", meta["labels"])
        out["labels"] = meta["labels"]
    if meta.get("annotations") is not None:
        metadata_annotations(w, "metadata.annotations", meta["annotations"])
        out["annotations"] = meta["annotations"]
    if kind.name == "Workload":
        if meta.get("uid") is None:
            w.required("metadata.uid")
        else:
            string(min_len=1, check=check_uid)(w, "metadata.uid", meta["uid"])
            out["uid"] = meta["uid"]
    return out


def validate_document(raw: RawDocument, default_namespace: str) -> Document | list[ConfigError]:
    """Validate and normalize one document; every problem is returned, none raised."""
    data = raw.data
    ref = _ref(data, default_namespace, raw.source.index)

    def fail(errors: Iterable[FieldError]) -> list[ConfigError]:
        return [ConfigError(raw.source, ref, e) for e in errors]

    if not isinstance(data, dict):
        return fail([FieldError("", f"a document must be an object, not {type_name(data)}")])
    kind_name = data.get("kind")
    if not isinstance(kind_name, str) or not kind_name:
        return fail([FieldError("kind", "Required value")])
    if kind_name in UNSUPPORTED_KINDS or kind_name not in KINDS:
        try:
            known = resolve(kind_name)
            message = f"kind {kind_name} is not supported (did you mean {known.name}?)"
        except UnknownKind as exc:
            message = str(exc)
        return fail([FieldError("", message)])
    kind = KINDS[kind_name]
    w = Walker()
    api_version = data.get("apiVersion")
    if api_version not in kind.api_versions:
        w.error(
            "apiVersion",
            f"Unsupported value: {api_version!r} for kind {kind.name}: supported values: "
            + ", ".join(kind.api_versions),
        )
    for key in data:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            w.error(str(key), "unknown field")
    meta = _metadata(w, data.get("metadata"), kind, default_namespace)
    spec = data.get("spec")
    if spec is None:
        w.required("spec")
    else:
        kind.spec(w, "spec", spec)
        if kind.namespaced is not None and isinstance(spec, dict):
            kind.namespaced(w, spec, meta.get("namespace", default_namespace))
    if w.errors:
        return fail(w.errors)
    spec = _strip_nulls(spec)
    if kind.normalize is not None:
        spec = kind.normalize(spec)
    body = {"apiVersion": api_version, "kind": kind.name, "metadata": meta, "spec": spec}
    _encodable(w, "", body)
    if not w.errors and len(encode(body)) > MAX_VALUE:
        w.error("", f"document is over the store's {MAX_VALUE} byte value limit")
    if w.errors:
        return fail(w.errors)
    name, namespace = meta["name"], meta["namespace"]
    return Document(
        raw.source, kind.name, namespace, name, store_key(kind.name, namespace, name, body), body
    )


def validate_batch(
    raws: Iterable[RawDocument], default_namespace: str = "default"
) -> tuple[list[Document], list[ConfigError]]:
    docs: list[Document] = []
    errors: list[ConfigError] = []
    for raw in raws:
        result = validate_document(raw, default_namespace)
        if isinstance(result, Document):
            docs.append(result)
        else:
            errors.extend(result)
    return docs, errors


def dedupe(docs: Iterable[Document]) -> list[Document]:
    """Later documents for the same key win, as if applied one after the other."""
    by_key: dict[str, Document] = {}
    for doc in docs:
        by_key.pop(doc.key, None)
        by_key[doc.key] = doc
    return list(by_key.values())


def _destinations(spec: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    for i, route in enumerate(spec.get("http") or []):
        for j, dest in enumerate(route.get("route") or []):
            yield f"spec.http[{i}].route[{j}].destination", dest["destination"]
        if route.get("mirror") is not None:
            yield f"spec.http[{i}].mirror", route["mirror"]
    for kind in ("tcp", "tls"):
        for i, route in enumerate(spec.get(kind) or []):
            for j, dest in enumerate(route.get("route") or []):
                yield f"spec.{kind}[{i}].route[{j}].destination", dest["destination"]


def check_references(
    docs: Iterable[Document], stored_rules: Mapping[str, dict[str, Any]]
) -> list[ConfigError]:
    """Subsets a VirtualService routes to must exist where checkable.

    `stored_rules` maps store keys to DestinationRule bodies already in the store; the batch's
    own DestinationRules replace those with the same key. A host with no DestinationRule is not
    checkable (it may be applied later) and passes.
    """
    docs = list(docs)
    rules = dict(stored_rules)
    for doc in docs:
        if doc.kind == "DestinationRule":
            rules[doc.key] = doc.body
    subsets: dict[str, tuple[set[str], list[str]]] = {}
    for body in rules.values():
        host = fqdn(body["spec"]["host"], body["metadata"]["namespace"])
        names, owners = subsets.setdefault(host, (set(), []))
        names.update(s["name"] for s in body["spec"].get("subsets") or [])
        owners.append(f"{body['metadata']['namespace']}/{body['metadata']['name']}")
    errors: list[ConfigError] = []
    for doc in docs:
        if doc.kind != "VirtualService":
            continue
        for path, dest in _destinations(doc.body["spec"]):
            subset = dest.get("subset")
            if subset is None:
                continue
            host = fqdn(dest["host"], doc.namespace)
            known = subsets.get(host)
            if known is None or subset in known[0]:
                continue
            defined = ", ".join(sorted(known[0])) or "none"
            errors.append(
                ConfigError(
                    doc.source,
                    doc.ref,
                    FieldError(
                        f"{path}.subset",
                        f'subset "{subset}" is not defined for host {dest["host"]} by '
                        f"DestinationRule {', '.join(sorted(known[1]))} (defined: {defined})",
                    ),
                )
            )
    return errors


__all__ = ["KINDS", "Document", "check_references", "dedupe", "validate_batch", "validate_document"]
