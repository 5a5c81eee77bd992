"""Formats shared by every kind: Kubernetes names and labels, selectors, hostnames, exportTo."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Validator,
    Walker,
    list_of,
    map_of,
    obj,
    string,
)

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_QUALIFIED = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?\Z")
_WILDCARD_LABEL = re.compile(r"\*([-A-Za-z0-9_]*[A-Za-z0-9])?\Z")
_HEADER = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def dns1123_label(value: str) -> str | None:
    if len(value) > 63 or not _LABEL.match(value):
        return (
            f"Invalid value: {value!r}: a DNS-1123 label must consist of lower case alphanumeric "
            "characters or '-', start and end with an alphanumeric character, at most 63 long"
        )
    return None


def dns1123_subdomain(value: str) -> str | None:
    if len(value) > 253 or not _SUBDOMAIN.match(value):
        return (
            f"Invalid value: {value!r}: a DNS-1123 subdomain must consist of lower case "
            "alphanumeric characters, '-' or '.', and start and end with an alphanumeric character"
        )
    return None


def label_key(value: str) -> str | None:
    prefix, sep, name = value.rpartition("/")
    if sep and (not prefix or dns1123_subdomain(prefix)):
        return f"Invalid value: {value!r}: label key prefix must be a DNS-1123 subdomain"
    if not name or len(name) > 63 or not _QUALIFIED.match(name):
        return (
            f"Invalid value: {value!r}: a label key must be at most 63 alphanumeric characters, "
            "'-', '_' or '.', starting and ending with an alphanumeric character"
        )
    return None


def label_value(value: str) -> str | None:
    if value and (len(value) > 63 or not _QUALIFIED.match(value)):
        return (
            f"Invalid value: {value!r}: a label value must be empty or at most 63 alphanumeric "
            "characters, '-', '_' or '.', starting and ending with an alphanumeric character"
        )
    return None


def _label_value_validator(*, no_wildcard: bool) -> Validator:
    def validate(w: Walker, path: str, value: Any) -> None:
        if not isinstance(value, str):
            w.error(path, f"label value must be a string, not {type(value).__name__}")
            return
        if no_wildcard and "*" in value:
            w.error(path, f'Invalid value: "{value}": wildcard is not supported in selector')
            return
        problem = label_value(value)
        if problem:
            w.error(path, problem)

    return validate


labels: Validator = map_of(_label_value_validator(no_wildcard=False), key=label_key, max_items=64)
selector_labels: Validator = map_of(
    _label_value_validator(no_wildcard=True), key=label_key, max_items=64
)

# Istio's WorkloadSelector ({matchLabels}) and Kubernetes' LabelSelector share this shape.
workload_selector: Validator = obj(
    {
        "matchLabels": selector_labels,
        "matchExpressions": Unsupported("only matchLabels selects workloads"),
    }
)


def _annotation_key(value: str) -> str | None:
    return label_key(value)


def _annotations(w: Walker, path: str, value: Any) -> None:
    def val(w2: Walker, p: str, v: Any) -> None:
        if not isinstance(v, str):
            w2.error(p, f"annotation value must be a string, not {type(v).__name__}")

    map_of(val, key=_annotation_key, max_items=256)(w, path, value)
    if isinstance(value, dict):
        size = sum(len(str(k)) + len(str(v)) for k, v in value.items())
        if size > 256 * 1024:
            w.error(path, f"annotations total {size} bytes, over the 262144 byte limit")


metadata_annotations: Validator = _annotations


def hostname(value: str, *, wildcard: bool = True) -> str | None:
    """Istio's ValidateWildcardDomain: DNS labels, the first may be `*` or `*suffix`."""
    if not value:
        return 'Invalid value: "": hostname must not be empty'
    if len(value) > 255:
        return f"Invalid value: {value!r}: hostname is longer than 255 characters"
    first, _, rest = value.partition(".")
    if rest:
        for part in rest.split("."):
            if len(part) > 63 or not _HOST_LABEL.match(part):
                return f"Invalid value: {value!r}: domain name invalid (label {part!r} invalid)"
    if first.startswith("*"):
        if not wildcard:
            return f"Invalid value: {value!r}: wildcard hosts are not allowed here"
        if not _WILDCARD_LABEL.match(first):
            return f"Invalid value: {value!r}: domain name invalid (label {first!r} invalid)"
        return None
    if len(first) > 63 or not _HOST_LABEL.match(first):
        return f"Invalid value: {value!r}: domain name invalid (label {first!r} invalid)"
    return None


def host_or_ip(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        return hostname(value)


def header_name(value: str) -> str | None:
    if not _HEADER.match(value):
        return f"Invalid value: {value!r}: not a valid HTTP header name"
    return None


def _export_to(value: str) -> str | None:
    if value in (".", "*"):
        return None
    return dns1123_label(value)


def _unique_strings(w: Walker, path: str, value: Any) -> None:
    seen: set[str] = set()
    for i, v in enumerate(value):
        if v in seen:
            w.error(f"{path}[{i}]", f'Duplicate value: "{v}"')
        seen.add(v)


def unique_ports(
    w: Walker,
    path: str,
    ports: list[dict[str, Any]],
    *,
    number_key: str,
    duplicate_number: str,
    names_required: bool,
) -> None:
    """Port names and numbers unique within a list (names required when there are several, as
    Kubernetes wants for Services). `duplicate_number` is formatted with the number."""
    names: set[str | None] = set()
    numbers: set[int] = set()
    for i, port in enumerate(ports):
        name = port.get("name")
        if names_required and len(ports) > 1 and not name:
            w.required(f"{path}[{i}].name")
        elif name in names:
            w.error(f"{path}[{i}].name", f'Duplicate value: "{name}"')
        names.add(name)
        number = port[number_key]
        if number in numbers:
            w.error(f"{path}[{i}].{number_key}", duplicate_number.format(number))
        numbers.add(number)


def export_to(w: Walker, path: str, value: Any) -> None:
    start = w.mark()
    list_of(string(check=_export_to))(w, path, value)
    if w.clean_since(start):
        _unique_strings(w, path, value)


def fqdn(host: str, namespace: str, domain: str = "cluster.local") -> str:
    """Istio's short-name resolution: a name without dots is a Service in `namespace`."""
    if "." in host or host.startswith("*"):
        return host.lower()
    return f"{host}.{namespace}.svc.{domain}".lower()
