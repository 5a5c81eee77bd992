"""Gateway (networking.istio.io): servers with port, hosts and TLS.

Supported: selector, servers[].{port{number, protocol, name}, hosts, name, tls{httpsRedirect,
mode SIMPLE/MUTUAL/ISTIO_MUTUAL/PASSTHROUGH, serverCertificate, privateKey, caCertificates,
credentialName, subjectAltNames, minProtocolVersion, maxProtocolVersion}}. Not supported: bind,
defaultEndpoint, port.targetPort, AUTO_PASSTHROUGH/OPTIONAL_MUTUAL, certificate pinning, cipher
suites.
"""

from __future__ import annotations

from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Validator,
    Walker,
    boolean,
    enum,
    list_of,
    obj,
    port_number,
    string,
    with_checks,
)
from nodeagent.config.validate.common import dns1123_label, hostname, selector_labels

PROTOCOLS = ["HTTP", "HTTPS", "GRPC", "HTTP2", "TCP", "TLS"]
_TLS_VERSIONS = ["TLS_AUTO", "TLSV1_2", "TLSV1_3"]


def _gateway_host(value: str) -> str | None:
    ns, sep, host = value.rpartition("/")
    if sep and ns not in ("*", ".") and dns1123_label(ns):
        return f"Invalid value: {value!r}: namespace must be '*', '.' or a DNS-1123 label"
    if host == "*":
        return None
    return hostname(host)


def _tls_check(w: Walker, path: str, value: Any) -> None:
    mode = value.get("mode")
    if mode in ("SIMPLE", "MUTUAL"):
        has_files = (
            value.get("serverCertificate") is not None or value.get("privateKey") is not None
        )
        if value.get("credentialName") is None and not (
            value.get("serverCertificate") and value.get("privateKey")
        ):
            w.error(path, f"{mode} TLS requires credentialName or serverCertificate and privateKey")
        elif value.get("credentialName") is not None and has_files:
            w.error(path, "only one of credentialName or serverCertificate/privateKey may be set")
    if mode == "MUTUAL" and value.get("credentialName") is None and not value.get("caCertificates"):
        w.error(path, "MUTUAL TLS requires caCertificates (or credentialName)")


_tls = obj(
    {
        "httpsRedirect": boolean,
        "mode": enum(
            ["PASSTHROUGH", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"],
            unsupported=["AUTO_PASSTHROUGH", "OPTIONAL_MUTUAL"],
        ),
        "serverCertificate": string(min_len=1),
        "privateKey": string(min_len=1),
        "caCertificates": string(min_len=1),
        "credentialName": string(min_len=1),
        "subjectAltNames": list_of(string(min_len=1)),
        "minProtocolVersion": enum(_TLS_VERSIONS, unsupported=["TLSV1_0", "TLSV1_1"]),
        "maxProtocolVersion": enum(_TLS_VERSIONS, unsupported=["TLSV1_0", "TLSV1_1"]),
        "credentialNames": Unsupported(),
        "tlsCertificates": Unsupported(),
        "verifyCertificateSpki": Unsupported(),
        "verifyCertificateHash": Unsupported(),
        "cipherSuites": Unsupported(),
        "caCrl": Unsupported(),
    },
    checks=[_tls_check],
)


def _server_check(w: Walker, path: str, value: Any) -> None:
    protocol = value["port"]["protocol"].upper()
    tls = value.get("tls")
    if protocol in ("HTTPS", "TLS") and (tls is None or tls.get("mode") is None):
        w.error(f"{path}.tls", f"server must have TLS settings (mode) for {protocol} protocol")
    if protocol not in ("HTTPS", "TLS") and tls is not None and tls.get("mode") is not None:
        w.error(
            f"{path}.tls.mode", f"TLS mode is only allowed for HTTPS or TLS servers, not {protocol}"
        )


def _protocol(w: Walker, path: str, value: Any) -> None:
    if not isinstance(value, str):
        w.error(path, "must be a string")
        return
    enum(PROTOCOLS, unsupported=["MONGO", "REDIS", "MYSQL", "UDP"])(w, path, value.upper())


_server = obj(
    {
        "port": obj(
            {
                "number": port_number,
                "protocol": _protocol,
                "name": string(min_len=1),
                "targetPort": Unsupported(),
            },
            required=["number", "protocol", "name"],
        ),
        "hosts": list_of(string(min_len=1, check=_gateway_host), min_items=1),
        "tls": _tls,
        "name": string(),
        "bind": Unsupported(),
        "defaultEndpoint": Unsupported(),
    },
    required=["port", "hosts"],
    checks=[_server_check],
)


def _servers_unique(w: Walker, path: str, value: Any) -> None:
    names: set[str] = set()
    for i, server in enumerate(value):
        name = server["port"]["name"]
        if name in names:
            w.error(
                f"{path}[{i}].port.name", f'Duplicate value: "{name}": port names must be unique'
            )
        names.add(name)


spec: Validator = obj(
    {
        "selector": selector_labels,
        "servers": with_checks(list_of(_server, min_items=1, max_items=256), _servers_unique),
    },
    required=["servers"],
)
