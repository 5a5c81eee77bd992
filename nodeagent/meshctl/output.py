"""How `meshctl get` prints documents: kubectl-like tables, or YAML/JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from nodeagent.config.kinds import Kind
from nodeagent.store.base import KeyValue

Row = tuple[KeyValue, dict[str, Any]]
Column = tuple[str, Callable[[Row], str]]


def _spec(row: Row) -> dict[str, Any]:
    spec = row[1].get("spec")
    return spec if isinstance(spec, dict) else {}


def _join(items: Any, limit: int = 4) -> str:
    if not items:
        return "<none>"
    items = [str(i) for i in items]
    shown = ",".join(items[:limit])
    return shown + (f" +{len(items) - limit} more" if len(items) > limit else "")


def _labels(mapping: Any) -> str:
    if not mapping:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def _ports(row: Row) -> str:
    ports = _spec(row).get("ports") or []
    return _join([f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports], limit=8)


def _servers(row: Row) -> str:
    servers = _spec(row).get("servers") or []
    return _join([f"{s['port'].get('number')}/{s['port'].get('protocol')}" for s in servers])


def _pa_mode(row: Row) -> str:
    mode = (_spec(row).get("mtls") or {}).get("mode") or "UNSET"
    levels = _spec(row).get("portLevelMtls") or {}
    extra = ",".join(f"{port}:{v.get('mode', 'UNSET')}" for port, v in levels.items())
    return f"{mode} ({extra})" if extra else mode


_COLUMNS: dict[str, list[Column]] = {
    "Service": [
        ("CLUSTER-IP", lambda r: str(_spec(r).get("clusterIP", "<pending>"))),
        ("PORTS", _ports),
    ],
    "Workload": [
        ("NODE", lambda r: str(_spec(r).get("node", ""))),
        ("ADDRESSES", lambda r: _join(_spec(r).get("addresses"))),
        ("SERVICE-ACCOUNT", lambda r: str(_spec(r).get("serviceAccount", ""))),
    ],
    "VirtualService": [
        ("GATEWAYS", lambda r: _join(_spec(r).get("gateways"))),
        ("HOSTS", lambda r: _join(_spec(r).get("hosts"))),
    ],
    "DestinationRule": [
        ("HOST", lambda r: str(_spec(r).get("host", ""))),
        ("SUBSETS", lambda r: _join([s.get("name") for s in _spec(r).get("subsets") or []])),
    ],
    "Gateway": [("SERVERS", _servers)],
    "ServiceEntry": [
        ("HOSTS", lambda r: _join(_spec(r).get("hosts"))),
        ("LOCATION", lambda r: str(_spec(r).get("location", "MESH_EXTERNAL"))),
        ("RESOLUTION", lambda r: str(_spec(r).get("resolution", "NONE"))),
    ],
    "AuthorizationPolicy": [
        ("ACTION", lambda r: str(_spec(r).get("action", "ALLOW"))),
        ("RULES", lambda r: str(len(_spec(r).get("rules") or []))),
    ],
    "PeerAuthentication": [("MODE", _pa_mode)],
    "Rollout": [
        ("HOST", lambda r: str(_spec(r).get("host", ""))),
        ("STABLE", lambda r: str(_spec(r).get("stable", ""))),
        ("CANARY", lambda r: str(_spec(r).get("canary", ""))),
    ],
}

_WIDE: dict[str, list[Column]] = {
    "Service": [("SELECTOR", lambda r: _labels(_spec(r).get("selector")))],
    "Workload": [
        ("UID", lambda r: str(r[1]["metadata"].get("uid", ""))),
        ("LABELS", lambda r: _labels(r[1]["metadata"].get("labels"))),
    ],
    "Gateway": [("SELECTOR", lambda r: _labels(_spec(r).get("selector")))],
    "AuthorizationPolicy": [
        ("SELECTOR", lambda r: _labels((_spec(r).get("selector") or {}).get("matchLabels")))
    ],
    "PeerAuthentication": [
        ("SELECTOR", lambda r: _labels((_spec(r).get("selector") or {}).get("matchLabels")))
    ],
}


def table(kind: Kind, rows: Sequence[Row], *, all_namespaces: bool, wide: bool) -> str:
    """A kubectl-style table. REVISION is the store revision of the document's last change
    (the store keeps no wall-clock times, so there is no AGE)."""
    columns: list[Column] = []
    if all_namespaces:
        columns.append(("NAMESPACE", lambda r: str(r[1]["metadata"].get("namespace", ""))))
    columns.append(("NAME", lambda r: str(r[1]["metadata"].get("name", ""))))
    columns.extend(_COLUMNS.get(kind.name, []))
    if wide:
        columns.extend(_WIDE.get(kind.name, []))
    columns.append(("REVISION", lambda r: str(r[0].mod_revision)))
    cells = [[head for head, _ in columns]]
    cells.extend([get(row) for _, get in columns] for row in rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    return "\n".join(lines) + "\n"


def _as_list(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": bodies}


def as_json(bodies: list[dict[str, Any]], *, single: bool) -> str:
    data = bodies[0] if single and len(bodies) == 1 else _as_list(bodies)
    return json.dumps(data, indent=2) + "\n"


def as_yaml(bodies: list[dict[str, Any]], *, single: bool) -> str:
    data = bodies[0] if single and len(bodies) == 1 else _as_list(bodies)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
