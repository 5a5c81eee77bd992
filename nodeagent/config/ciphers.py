"""The TLS 1.2 cipher suites a Gateway's `tls.cipherSuites` (and a DestinationRule's) may name.

Istio's names (Envoy's BoringSSL spelling) are OpenSSL names already; the IANA spelling
(`TLS_ECDHE_…_WITH_…`) is accepted too and mapped. Only suites OpenSSL 3 serves at its default
security level are listed (no 3DES). TLS 1.3 suites are not configurable, as in Envoy.
"""

from __future__ import annotations

from collections.abc import Mapping

# Istio's accepted TLS 1.2 cipher suites (security.ValidCipherSuites) that OpenSSL 3 serves,
# by IANA name → OpenSSL name. The OpenSSL names are Istio's own spelling.
CIPHER_SUITES: Mapping[str, str] = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
}
_OPENSSL_NAMES = frozenset(CIPHER_SUITES.values())


def openssl_cipher(name: str) -> str | None:
    """The OpenSSL name of an Istio/Envoy or IANA cipher suite name, None if not served."""
    if name in _OPENSSL_NAMES:
        return name
    return CIPHER_SUITES.get(name)
