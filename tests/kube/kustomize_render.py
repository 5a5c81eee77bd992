"""Render a kustomization without a kustomize binary (none is packaged for Debian here).

Supports exactly what daemonset/ uses, and refuses anything else so a manifest change that needs
real kustomize fails loudly instead of rendering wrongly: `resources` (files and directories),
`namespace` (set on namespaced objects), and `patches` with an inline JSON 6902 patch and a
`target` of kind + name. Output order: resources in the order listed, as kustomize keeps it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
}
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}


class RenderError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        parts = _pointer(op["path"])
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        kind = op["op"]
        if kind == "add":
            if isinstance(parent, list):
                value = copy.deepcopy(op["value"])
                if last == "-":
                    parent.append(value)
                else:
                    parent.insert(int(last), value)
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise RenderError(f"replace {op['path']}: no such member")
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise RenderError(f"JSON patch op {kind!r} not supported by this renderer")


def render(directory: Path) -> list[dict[str, Any]]:
    kfile = directory / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text())
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: unsupported keys {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    for res in spec.get("resources") or []:
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in spec.get("patches") or []:
        if set(patch) != {"target", "patch"} or set(patch["target"]) - {"kind", "name"}:
            raise RenderError(f"{kfile}: only inline JSON 6902 patches with kind/name targets")
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise RenderError(f"{kfile}: strategic-merge patches are not supported here")
        target = patch["target"]
        matched = [
            d
            for d in docs
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        if not matched:
            raise RenderError(f"{kfile}: patch target {target} matches nothing")
        for d in matched:
            apply_json6902(d, ops)
    namespace = spec.get("namespace")
    if namespace:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = namespace
    return docs
