"""A Gateway server's `tls` block compiled into typed settings (pure: no files, no sockets).

`server_tls(mapping)` turns Istio's `ServerTLSSettings` into `ServerTls`; the listener builds an
`ssl.SSLContext` from it (`credentials.py`). Cipher suites are Istio's (Envoy's BoringSSL)
names, which are OpenSSL names already; the IANA spelling (`TLS_ECDHE_…_WITH_…`) is accepted
too and mapped. They apply to TLS 1.2: TLS 1.3 suites are not configurable, as in Envoy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.config.ciphers import openssl_cipher

TERMINATING = frozenset({"SIMPLE", "MUTUAL"})
SERVED_MODES = TERMINATING | {"PASSTHROUGH"}

VERSIONS = ("TLSV1_2", "TLSV1_3")  # TLS_AUTO: Envoy's gateway default, 1.2 to 1.3


@dataclass(frozen=True, slots=True)
class ServerTls:
    """What a terminating or passthrough server needs, as typed fields.

    Either `credential_name` (resolved by the credential source) or the file paths are set
    for SIMPLE/MUTUAL; PASSTHROUGH uses neither.
    """

    mode: str
    credential_name: str | None = None
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    min_version: str = "TLSV1_2"
    max_version: str = "TLSV1_3"
    cipher_suites: tuple[str, ...] = ()  # OpenSSL names, the configured order

    @property
    def terminates(self) -> bool:
        return self.mode in TERMINATING

    @property
    def mutual(self) -> bool:
        return self.mode == "MUTUAL"


class TlsSettingsError(ValueError):
    """A stored `tls` block the gateway cannot serve (validation should have refused it)."""


def _version(value: Any, default: str) -> str:
    if value in (None, "TLS_AUTO"):
        return default
    if value not in VERSIONS:
        raise TlsSettingsError(f"protocol version {value!r} is not served (TLSV1_2, TLSV1_3)")
    return str(value)


def server_tls(tls: Mapping[str, Any]) -> ServerTls:
    """Compile one `servers[].tls` mapping (its `mode` set). TlsSettingsError names the field."""
    mode = str(tls.get("mode", ""))
    if mode not in SERVED_MODES:
        raise TlsSettingsError(f"tls.mode {mode!r} is not served")
    ciphers = []
    for name in tls.get("cipherSuites") or ():
        mapped = openssl_cipher(str(name))
        if mapped is None:
            raise TlsSettingsError(f"tls.cipherSuites: {name!r} is not a served cipher suite")
        ciphers.append(mapped)

    def text(key: str) -> str | None:
        value = tls.get(key)
        return str(value) if value else None

    return ServerTls(
        mode=mode,
        credential_name=text("credentialName"),
        server_certificate=text("serverCertificate"),
        private_key=text("privateKey"),
        ca_certificates=text("caCertificates"),
        subject_alt_names=tuple(str(s) for s in tls.get("subjectAltNames") or ()),
        min_version=_version(tls.get("minProtocolVersion"), "TLSV1_2"),
        max_version=_version(tls.get("maxProtocolVersion"), "TLSV1_3"),
        cipher_suites=tuple(ciphers),
    )
