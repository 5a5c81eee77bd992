"""Gateway (networking.istio.io): servers with port, hosts and TLS.

Supported, as the gateway serves them (nodeagent/gateway): selector, servers[].{port{number,
protocol HTTP/HTTPS/TLS, name}, hosts, name, tls{httpsRedirect, mode SIMPLE/MUTUAL on HTTPS,
PASSTHROUGH on TLS, serverCertificate, privateKey, caCertificates, credentialName,
subjectAltNames, minProtocolVersion, maxProtocolVersion, cipherSuites}}. Not supported (refused
by name, never accepted and left unserved): protocols GRPC/HTTP2/TCP/MONGO/REDIS/MYSQL/UDP,
ISTIO_MUTUAL/AUTO_PASSTHROUGH/OPTIONAL_MUTUAL, TLS termination on a TLS server, bind,
defaultEndpoint, port.targetPort, certificate pinning, CRLs, TLS 1.0/1.1.
"""

from __future__ import annotations

from typing import Any

from nodeagent.config.ciphers import openssl_cipher
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

PROTOCOLS = ["HTTP", "HTTPS", "TLS"]
_NOT_SERVED_PROTOCOLS = ["GRPC", "HTTP2", "TCP", "MONGO", "REDIS", "MYSQL", "UDP"]
_TLS_VERSIONS = ["TLS_AUTO", "TLSV1_2", "TLSV1_3"]
_CERT_FIELDS = ("credentialName", "serverCertificate", "privateKey", "caCertificates")


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
    if mode == "PASSTHROUGH":
        # Istio warns that these are ignored; a mesh that cannot warn refuses what it ignores.
        for key in (*_CERT_FIELDS, "subjectAltNames", "cipherSuites"):
            if value.get(key) is not None:
                w.error(f"{path}.{key}", "PASSTHROUGH does not use certificates or cipher suites")
    if mode != "MUTUAL" and value.get("subjectAltNames"):
        w.error(f"{path}.subjectAltNames", "only MUTUAL verifies client certificates")
    low, high = value.get("minProtocolVersion"), value.get("maxProtocolVersion")
    ranked = [v for v in (low, high) if v in _TLS_VERSIONS and v != "TLS_AUTO"]
    if len(ranked) == 2 and _TLS_VERSIONS.index(low) > _TLS_VERSIONS.index(high):
        w.error(
            f"{path}.maxProtocolVersion",
            f"maxProtocolVersion {high} is lower than minProtocolVersion {low}",
        )


def _cipher(w: Walker, path: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        w.error(path, "must be a non-empty string")
    elif openssl_cipher(value) is None:
        w.error(
            path,
            f"cipher suite {value!r} is not supported (TLS 1.2 ECDHE/RSA AES-GCM, "
            "CHACHA20-POLY1305 and AES-CBC suites, by OpenSSL or IANA name)",
        )


def _ciphers_unique(w: Walker, path: str, value: Any) -> None:
    seen: set[str] = set()
    for i, name in enumerate(value):
        mapped = openssl_cipher(name) if isinstance(name, str) else None
        if mapped is not None and mapped in seen:
            w.error(f"{path}[{i}]", f'Duplicate value: "{name}"')
        if mapped is not None:
            seen.add(mapped)


_tls = obj(
    {
        "httpsRedirect": boolean,
        "mode": enum(
            ["PASSTHROUGH", "SIMPLE", "MUTUAL"],
            unsupported=["ISTIO_MUTUAL", "AUTO_PASSTHROUGH", "OPTIONAL_MUTUAL"],
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
        "cipherSuites": with_checks(list_of(_cipher, max_items=64), _ciphers_unique),
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
    mode = tls.get("mode") if tls is not None else None
    if protocol == "HTTPS" and mode == "PASSTHROUGH":
        w.error(f"{path}.tls.mode", "PASSTHROUGH is served on protocol TLS servers, not HTTPS")
    if protocol == "TLS" and mode in ("SIMPLE", "MUTUAL"):
        w.error(
            f"{path}.tls.mode",
            f"{mode} on a TLS server (terminate, then TCP) is not supported: use protocol HTTPS",
        )
    if protocol != "HTTP" and tls is not None and tls.get("httpsRedirect"):
        w.error(f"{path}.tls.httpsRedirect", "httpsRedirect applies to HTTP servers only")


def _protocol(w: Walker, path: str, value: Any) -> None:
    if not isinstance(value, str):
        w.error(path, "must be a string")
        return
    enum(PROTOCOLS, unsupported=_NOT_SERVED_PROTOCOLS)(w, path, value.upper())


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
