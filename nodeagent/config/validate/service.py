"""Service (Kubernetes core v1) and Workload (the mesh registry's record of a pod).

Service: selector, ports (name, port, targetPort, protocol TCP, appProtocol), clusterIP (an IPv4
address, "None" for headless, or absent: the mesh allocates a VIP when applying). Defaults are
filled in as Kubernetes does (protocol TCP, targetPort = port). Not supported: other Service
types, UDP/SCTP ports, nodePort, session affinity, external IPs, IPv6.
"""

from __future__ import annotations

import re
from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Validator,
    Walker,
    enum,
    ipv4,
    list_of,
    obj,
    port_number,
    string,
)
from nodeagent.config.validate.common import (
    dns1123_label,
    dns1123_subdomain,
    labels,
    unique_ports,
)

_IANA_SVC_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")


def _target_port(w: Walker, path: str, value: Any) -> None:
    if isinstance(value, str):
        if len(value) > 15 or not _IANA_SVC_NAME.match(value) or "--" in value:
            w.error(path, f"Invalid value: {value!r}: must be a port number or an IANA_SVC_NAME")
        return
    port_number(w, path, value)


def _cluster_ip(value: str) -> str | None:
    if value in ("None", ""):
        return None
    return ipv4(value)


_port = obj(
    {
        "name": string(check=dns1123_label),
        "port": port_number,
        "targetPort": _target_port,
        "protocol": enum(["TCP"], unsupported=["UDP", "SCTP"]),
        "appProtocol": string(min_len=1, max_len=256),
        "nodePort": Unsupported("only ClusterIP services"),
    },
    required=["port"],
)


def _ports(w: Walker, path: str, value: Any) -> None:
    start = w.mark()
    list_of(_port, max_items=256)(w, path, value)
    if w.clean_since(start):
        unique_ports(
            w,
            path,
            value,
            number_key="port",
            duplicate_number="Duplicate value: {}",
            names_required=True,
        )


def _spec_check(w: Walker, path: str, spec: Any) -> None:
    cluster_ip = spec.get("clusterIP") or ""
    ips = spec.get("clusterIPs")
    if ips is not None and ips and ips != [cluster_ip] and cluster_ip:
        w.error(f"{path}.clusterIPs", "must equal [clusterIP] (single-stack IPv4 only)")
    if cluster_ip != "None" and not spec.get("ports"):
        w.required(f"{path}.ports")


service_spec: Validator = obj(
    {
        "selector": labels,
        "ports": _ports,
        "clusterIP": string(check=_cluster_ip),
        "clusterIPs": list_of(string(check=_cluster_ip), max_items=1),
        "type": enum(["ClusterIP"], unsupported=["NodePort", "LoadBalancer", "ExternalName"]),
        "sessionAffinity": enum(["None"], unsupported=["ClientIP"]),
        "ipFamilies": list_of(enum(["IPv4"], unsupported=["IPv6"]), max_items=1),
        "ipFamilyPolicy": enum(
            ["SingleStack"], unsupported=["PreferDualStack", "RequireDualStack"]
        ),
        "internalTrafficPolicy": enum(["Cluster"], unsupported=["Local"]),
        "externalIPs": Unsupported(),
        "externalName": Unsupported(),
        "externalTrafficPolicy": Unsupported(),
        "loadBalancerIP": Unsupported(),
        "loadBalancerSourceRanges": Unsupported(),
        "loadBalancerClass": Unsupported(),
        "healthCheckNodePort": Unsupported(),
        "publishNotReadyAddresses": Unsupported(),
        "sessionAffinityConfig": Unsupported(),
        "allocateLoadBalancerNodePorts": Unsupported(),
        "trafficDistribution": Unsupported(),
    },
    checks=[_spec_check],
)


def normalize_service(spec: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes' defaults: protocol TCP, targetPort = port; clusterIPs folded into clusterIP."""
    out = {k: v for k, v in spec.items() if k not in ("clusterIPs", "clusterIP")}
    ports = []
    for port in spec.get("ports") or []:
        p = dict(port)
        p.setdefault("protocol", "TCP")
        p.setdefault("targetPort", p["port"])
        ports.append(p)
    out["ports"] = ports
    cluster_ip = spec.get("clusterIP") or ((spec.get("clusterIPs") or [""])[0])
    if cluster_ip:
        out["clusterIP"] = cluster_ip
    return out


def _addresses_check(w: Walker, path: str, value: Any) -> None:
    if len(set(value)) != len(value):
        w.error(path, "Duplicate value: addresses must be unique")


workload_spec: Validator = obj(
    {
        "node": string(min_len=1, check=dns1123_subdomain),
        "addresses": list_of(string(check=ipv4), min_items=1, max_items=16),
        "serviceAccount": string(min_len=1, check=dns1123_subdomain),
    },
    required=["node", "addresses"],
    checks=[lambda w, p, v: _addresses_check(w, f"{p}.addresses", v["addresses"])],
)

_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def uid(value: str) -> str | None:
    if not _UID.match(value):
        return f"Invalid value: {value!r}: uid must be 1-128 characters of A-Z a-z 0-9 . _ -"
    return None


def normalize_workload(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "serviceAccount": spec.get("serviceAccount") or "default"}
