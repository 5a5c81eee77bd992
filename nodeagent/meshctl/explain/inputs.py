"""What `meshctl explain` is asked: the target URL (`parse_target`), extra headers
(`parse_headers`), and the caller (a pod by namespace/name, or the ingress gateway) as found in
the snapshot. Bad input raises `ExplainError` naming the problem.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from nodeagent.gateway.server import DEFAULT_LABELS
from nodeagent.snapshot import Snapshot, Workload

PREFIX = "/mesh/v1/"
GATEWAY_SOURCE = "gateway"
GATEWAY_WORKLOAD = ("istio-system", "istio-ingressgateway")
# Istio's default service account of the ingress gateway, used when no gateway workload is
# registered (the identity the gateway would present).
GATEWAY_SERVICE_ACCOUNT = "istio-ingressgateway-service-account"
_DEFAULT_PORTS = {"http": 80, "https": 443, "grpc": 80}
_MAX_HEADERS = 100


class ExplainError(Exception):
    """Bad input (unknown pod, unparsable URL, unknown host): one line for the operator."""


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The parsed `--to` URL."""

    url: str
    scheme: str  # http, https, tcp or grpc
    host: str  # lower case, no brackets
    port: int
    authority: str  # host[:port] as the client sends it in Host
    path: str
    query: str

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_target(url: str) -> Target:
    """`http://host[:port]/path?q`, `tcp://host:port`, `https://…`,
    `grpc://host[:port]/package.Service/Method` (a gRPC call: POST, content-type
    application/grpc); no scheme means http."""
    text = url.strip()
    if not text:
        raise ExplainError("--to: empty URL")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ExplainError(f"--to {url!r}: not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "tcp", "grpc"):
        raise ExplainError(f"--to {url!r}: scheme {scheme!r} is not one of http, https, tcp, grpc")
    if scheme == "grpc":
        service, sep, method = parts.path.lstrip("/").partition("/")
        if not sep or not service or not method or "/" in method or parts.query:
            raise ExplainError(
                f"--to {url!r}: a gRPC method is grpc://host[:port]/package.Service/Method"
            )
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise ExplainError(f"--to {url!r}: no host")
    if port is None:
        if scheme == "tcp":
            raise ExplainError(f"--to {url!r}: a tcp:// URL needs a port")
        port = _DEFAULT_PORTS[scheme]
    if port == 0:
        raise ExplainError(f"--to {url!r}: port 0 is not a destination")
    netloc = parts.netloc.rpartition("@")[2]
    return Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        authority=netloc.lower(),
        path=parts.path or "/",
        query=parts.query,
    )


def parse_headers(items: Sequence[str]) -> dict[str, str]:
    """`-H 'Name: value'` → lower-case names; repeated headers joined with ", " (as routing)."""
    if len(items) > _MAX_HEADERS:
        raise ExplainError(f"-H: {len(items)} headers (at most {_MAX_HEADERS})")
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or not name or any(c.isspace() for c in name):
            raise ExplainError(f"-H {item!r}: expected 'Name: value'")
        value = value.strip()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


# -- the source --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    kind: str  # "workload" or "gateway"
    ref: str
    namespace: str
    labels: Mapping[str, str]
    ip: str | None
    node: str | None
    identity: str
    assumed: bool  # the gateway is not a registered workload: labels and identity are defaults

    @property
    def principal(self) -> str:
        return self.identity.removeprefix("spiffe://")


def _find_workload(snap: Snapshot, namespace: str, name: str) -> Workload | None:
    found = sorted(
        (w for w in snap.workloads() if w.namespace == namespace and w.name == name),
        key=lambda w: w.uid,
    )
    return found[0] if found else None


def find_caller(snap: Snapshot, source: str, default_namespace: str) -> Caller:
    if source == GATEWAY_SOURCE:
        wl = _find_workload(snap, *GATEWAY_WORKLOAD)
        ref = "/".join(GATEWAY_WORKLOAD)
        if wl is not None:
            labels = wl.labels if wl.labels else DEFAULT_LABELS
            return Caller(
                "gateway", ref, wl.namespace, labels, wl.address, wl.node, wl.identity, False
            )
        identity = (
            f"spiffe://{snap.trust_domain}/ns/{GATEWAY_WORKLOAD[0]}/sa/{GATEWAY_SERVICE_ACCOUNT}"
        )
        return Caller(
            "gateway", ref, GATEWAY_WORKLOAD[0], DEFAULT_LABELS, None, None, identity, True
        )
    namespace, _, name = source.rpartition("/")
    namespace = namespace or default_namespace
    if not name or "/" in namespace:
        raise ExplainError(f"--from {source!r}: expected [namespace/]name or 'gateway'")
    wl = _find_workload(snap, namespace, name)
    if wl is None:
        raise ExplainError(
            f"--from {source!r}: no workload {namespace}/{name} in the store "
            f"(revision {snap.revision})"
        )
    return Caller(
        "workload", wl.ref, wl.namespace, wl.labels, wl.address, wl.node, wl.identity, False
    )
