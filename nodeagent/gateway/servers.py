"""Which Gateway server serves a connection or a request (pure: reads a Snapshot, no sockets).

A Gateway whose `selector` matches the gateway's labels contributes its servers: `HTTP`
(plain; `tls.httpsRedirect` makes it answer 301 to https), `HTTPS` with `tls.mode` SIMPLE or
MUTUAL (terminated here), `TLS` with PASSTHROUGH (routed on SNI, not terminated). A port is a
TLS port when any of its servers is TLS; plain servers on it are dropped (Istio rejects the mix).
On a TLS port the ClientHello's SNI picks the server (`server_for_sni`, Envoy's filter chain
match: exact name, then the longest wildcard, then a `*` server, which also takes connections
without SNI); the requests of that connection must name one of that server's hosts, or they
get 404 as Envoy answers (the connection-reuse trap Istio documents as IST0138).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.gateway.tls_settings import ServerTls, TlsSettingsError, server_tls
from nodeagent.log import get_logger
from nodeagent.snapshot import hosts
from nodeagent.snapshot.snapshot import Snapshot

log = get_logger("gateway")

SERVED_PROTOCOLS = frozenset({"HTTP", "HTTPS", "TLS"})


@dataclass(frozen=True, slots=True)
class ServerBinding:
    """One served server of one Gateway on a port."""

    gateway: str  # ns/name
    namespace: str
    hosts: tuple[str, ...]
    tls: ServerTls | None = None  # None: plain HTTP
    https_redirect: bool = False
    name: str = ""  # the port name, for logs

    @property
    def passthrough(self) -> bool:
        return self.tls is not None and self.tls.mode == "PASSTHROUGH"


def host_matches(pattern: str, host: str) -> bool:
    """A Gateway server host (`*`, `*.example.com`, `ns/host`) against a request's host."""
    pattern = hosts.normalize(pattern.rpartition("/")[2])
    host = hosts.normalize(host)
    if pattern == "*":
        return True
    if hosts.is_wildcard(pattern):
        return hosts.wildcard_matches(pattern, host)
    return pattern == host


def _binding(gw_ref: str, namespace: str, server: Mapping[str, Any]) -> ServerBinding | None:
    port: Mapping[str, Any] = server.get("port") or {}
    protocol = str(port.get("protocol", "")).upper()
    if protocol not in SERVED_PROTOCOLS:
        return None
    tls_doc: Mapping[str, Any] = server.get("tls") or {}
    hs = tuple(str(h) for h in server.get("hosts") or ("*",))
    name = str(port.get("name", ""))
    if protocol == "HTTP":
        return ServerBinding(
            gw_ref, namespace, hs, https_redirect=bool(tls_doc.get("httpsRedirect")), name=name
        )
    try:
        tls = server_tls(tls_doc)
    except TlsSettingsError as exc:
        log.error("gateway.server_skipped", gateway=gw_ref, port=name, error=str(exc))
        return None
    if (protocol == "HTTPS") != tls.terminates:  # HTTPS terminates, TLS passes through
        log.error(
            "gateway.server_skipped",
            gateway=gw_ref,
            port=name,
            error=f"{protocol} server with tls.mode {tls.mode} is not served",
        )
        return None
    return ServerBinding(gw_ref, namespace, hs, tls=tls, name=name)


def servers_by_port(
    snapshot: Snapshot, labels: Mapping[str, str]
) -> dict[int, tuple[ServerBinding, ...]]:
    """The served servers of the Gateways selecting `labels`, per port, in a stable order."""
    out: dict[int, list[ServerBinding]] = {}
    for ref in sorted(snapshot.indexes.gateways):
        gw = snapshot.indexes.gateways[ref]
        if not gw.selector or not hosts.labels_match(gw.selector, labels):
            continue
        for server in gw.servers:
            binding = _binding(gw.ref, gw.namespace, server)
            if binding is not None:
                out.setdefault(int(server["port"]["number"]), []).append(binding)
    result = {}
    for port, bindings in out.items():
        if any(b.tls is not None for b in bindings):
            bindings = [b for b in bindings if b.tls is not None]
        result[port] = tuple(bindings)
    return result


def is_tls_port(bindings: tuple[ServerBinding, ...]) -> bool:
    return any(b.tls is not None for b in bindings)


def _sni_rank(pattern: str, sni: str | None) -> tuple[int, int] | None:
    """How well a server host matches an SNI (higher is better), None for no match."""
    host = hosts.normalize(pattern.rpartition("/")[2])
    if host == "*":
        return (0, 0)
    if sni is None:
        return None
    if hosts.is_wildcard(host):
        return (1, len(host)) if hosts.wildcard_matches(host, sni) else None
    return (2, 0) if host == sni else None


def server_for_sni(bindings: tuple[ServerBinding, ...], sni: str | None) -> ServerBinding | None:
    """The TLS server of a port that a ClientHello's SNI selects (None: no server: refuse)."""
    best: tuple[tuple[int, int], int] | None = None
    for i, binding in enumerate(bindings):
        if binding.tls is None:
            continue
        for pattern in binding.hosts:
            rank = _sni_rank(pattern, sni.lower().rstrip(".") if sni else None)
            if rank is not None and (best is None or rank > best[0]):
                best = (rank, i)
    return bindings[best[1]] if best is not None else None


def server_for_host(bindings: tuple[ServerBinding, ...], host: str) -> ServerBinding | None:
    """The first server of a port whose hosts match a request's host."""
    for binding in bindings:
        if any(host_matches(h, host) for h in binding.hosts):
            return binding
    return None
