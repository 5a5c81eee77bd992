"""ServiceEntry (networking.istio.io): services outside (or added to) the registry.

Supported: hosts, addresses, ports (HTTP, HTTPS, HTTP2, GRPC, TCP, TLS), location, resolution
(NONE, STATIC, DNS, DNS_ROUND_ROBIN), endpoints (address, ports, labels, weight, serviceAccount),
workloadSelector, exportTo, subjectAltNames. Not supported: endpoint network/locality, unix
socket endpoints, UDP and other protocols.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Validator,
    Walker,
    enum,
    integer,
    ip_or_cidr,
    list_of,
    map_of,
    obj,
    port_number,
    string,
)
from nodeagent.config.validate.common import (
    export_to,
    host_or_ip,
    hostname,
    labels,
    selector_labels,
    unique_ports,
)

PROTOCOLS = ["HTTP", "HTTPS", "GRPC", "HTTP2", "TCP", "TLS"]


def _se_host(value: str) -> str | None:
    if value == "*":
        return 'Invalid value: "*": hostname cannot be wildcard'
    return hostname(value)


def _protocol(w: Walker, path: str, value: Any) -> None:
    if not isinstance(value, str):
        w.error(path, "must be a string")
        return
    enum(PROTOCOLS, unsupported=["MONGO", "REDIS", "MYSQL", "UDP"])(w, path, value.upper())


_port = obj(
    {
        "number": port_number,
        "protocol": _protocol,
        "name": string(min_len=1),
        "targetPort": port_number,
    },
    required=["number", "name"],
)


def _endpoint_address(value: str) -> str | None:
    if value.startswith("unix://"):
        return f"Invalid value: {value!r}: unix socket endpoints are not supported"
    return host_or_ip(value)


_endpoint = obj(
    {
        "address": string(min_len=1, check=_endpoint_address),
        "ports": map_of(port_number, key=lambda k: None if k else "port name must not be empty"),
        "labels": labels,
        "weight": integer(minimum=0, maximum=2**32 - 1),
        "serviceAccount": string(min_len=1),
        "network": Unsupported(),
        "locality": Unsupported(),
    }
)


def _ports(w: Walker, path: str, value: Any) -> None:
    start = w.mark()
    list_of(_port, max_items=256)(w, path, value)
    if w.clean_since(start):
        unique_ports(
            w,
            path,
            value,
            number_key="number",
            duplicate_number="port number cannot be duplicated: {}",
            names_required=False,
        )


def _spec_check(w: Walker, path: str, spec: Any) -> None:
    resolution = spec.get("resolution", "NONE")
    endpoints = spec.get("endpoints") or []
    if spec.get("workloadSelector") is not None and spec.get("endpoints") is not None:
        w.error(path, "only one of WorkloadSelector or Endpoints can be set")
    for i, address in enumerate(spec.get("addresses") or []):
        if "/" in address and resolution not in ("NONE", "STATIC"):
            net = ipaddress.ip_network(address, strict=False)
            if net.prefixlen != net.max_prefixlen:
                w.error(
                    f"{path}.addresses[{i}]",
                    f"Invalid value: {address!r}: CIDR addresses are allowed only for "
                    "NONE/STATIC resolution types",
                )
    if resolution == "NONE" and endpoints:
        w.error(f"{path}.endpoints", "NONE mode cannot set endpoints")
    if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
        w.error(f"{path}.endpoints", "DNS_ROUND_ROBIN mode cannot have multiple endpoints")
    if resolution == "STATIC":
        for i, ep in enumerate(endpoints):
            try:
                ipaddress.ip_address(ep.get("address", ""))
            except ValueError:
                w.error(
                    f"{path}.endpoints[{i}].address",
                    f"Invalid value: {ep.get('address')!r}: STATIC resolution needs IP addresses",
                )
    port_names = {p["name"] for p in spec.get("ports") or []}
    for i, ep in enumerate(endpoints):
        for name in ep.get("ports") or {}:
            if name not in port_names:
                w.error(f"{path}.endpoints[{i}].ports[{name}]", f"port {name!r} is not declared")


spec: Validator = obj(
    {
        "hosts": list_of(string(min_len=1, check=_se_host), min_items=1, max_items=256),
        "addresses": list_of(string(min_len=1, check=ip_or_cidr), max_items=256),
        "ports": _ports,
        "location": enum(["MESH_EXTERNAL", "MESH_INTERNAL"]),
        "resolution": enum(["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]),
        "endpoints": list_of(_endpoint, max_items=4096),
        "workloadSelector": obj({"labels": selector_labels}),
        "exportTo": export_to,
        "subjectAltNames": list_of(string(min_len=1)),
    },
    required=["hosts"],
    checks=[_spec_check],
)
