"""Pure server choice: served protocols, TLS settings compiled, SNI → server, Host → server."""

from __future__ import annotations

from typing import Any

import pytest
from http_helpers import build

from nodeagent.gateway.servers import ServerBinding, server_for_sni, servers_by_port
from nodeagent.gateway.tls_settings import ServerTls, TlsSettingsError, server_tls

LABELS = {"istio": "ingressgateway"}


def gw(*servers: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "Gateway",
        "metadata": {"name": "g", "namespace": "default"},
        "spec": {"selector": LABELS, "servers": list(servers)},
    }


def server(number: int, protocol: str, hosts: list[str], **tls: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "port": {"number": number, "name": f"{protocol.lower()}-{number}-{hosts[0]}",
                 "protocol": protocol},
        "hosts": hosts,
    }  # fmt: skip
    if tls:
        out["tls"] = tls
    return out


def tls_binding(*hosts: str) -> ServerBinding:
    return ServerBinding("default/g", "default", hosts, tls=ServerTls("SIMPLE", "c"))


def test_https_and_passthrough_are_served_other_protocols_are_not() -> None:
    snap = build(
        gw(
            server(80, "HTTP", ["*"]),
            server(443, "HTTPS", ["a.example.com"], mode="SIMPLE", credentialName="a"),
            server(443, "TLS", ["p.example.com"], mode="PASSTHROUGH"),
            server(9000, "TCP", ["*"]),
        )
    )
    by_port = servers_by_port(snap, LABELS)
    assert set(by_port) == {80, 443}
    assert [b.tls.mode if b.tls else None for b in by_port[443]] == ["SIMPLE", "PASSTHROUGH"]
    assert by_port[80][0].tls is None


def test_plain_servers_on_a_tls_port_are_dropped() -> None:
    snap = build(
        gw(
            server(443, "HTTP", ["x.example.com"]),
            server(443, "HTTPS", ["a.example.com"], mode="SIMPLE", credentialName="a"),
        )
    )
    assert [b.hosts for b in servers_by_port(snap, LABELS)[443]] == [("a.example.com",)]


def test_sni_picks_exact_then_longest_wildcard_then_catch_all() -> None:
    exact, wild, wider, anything = (
        tls_binding("a.example.com"),
        tls_binding("*.example.com"),
        tls_binding("*.com"),
        tls_binding("*"),
    )
    bindings = (anything, wider, wild, exact)
    assert server_for_sni(bindings, "a.example.com") is exact
    assert server_for_sni(bindings, "B.example.com.") is wild
    assert server_for_sni(bindings, "x.com") is wider
    assert server_for_sni(bindings, "other.org") is anything
    assert server_for_sni(bindings, None) is anything
    assert server_for_sni((exact, wild), None) is None
    assert server_for_sni((exact,), "b.example.com") is None


def test_tls_settings_compile_versions_and_cipher_names() -> None:
    tls = server_tls(
        {
            "mode": "MUTUAL",
            "credentialName": "c",
            "minProtocolVersion": "TLS_AUTO",
            "maxProtocolVersion": "TLSV1_2",
            "cipherSuites": [
                "ECDHE-RSA-AES128-GCM-SHA256",
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            ],
            "subjectAltNames": ["client.example.com"],
        }
    )
    assert tls.mutual
    assert (tls.min_version, tls.max_version) == ("TLSV1_2", "TLSV1_2")
    assert tls.cipher_suites == ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305")
    with pytest.raises(TlsSettingsError, match="RC4-MD5"):
        server_tls({"mode": "SIMPLE", "cipherSuites": ["RC4-MD5"]})
    with pytest.raises(TlsSettingsError, match="ISTIO_MUTUAL"):
        server_tls({"mode": "ISTIO_MUTUAL"})
