"""Host names and label selectors: the small pure rules the snapshot's indexes are built on.

Istio's rules, written once: a host without a dot is a short name, qualified with the namespace
of the resource that wrote it (`reviews` in `default` → `reviews.default.svc.cluster.local`); a host
starting with `*` is a wildcard matching every host that ends with the rest (`*.example.com`,
`*x`; `*` alone matches everything); hosts compare case-insensitively and without a trailing dot.
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
MESH_GATEWAY = "mesh"


def normalize(host: str) -> str:
    """The comparable form of a host: lower case, no trailing dot."""
    return host.lower().rstrip(".")


def is_wildcard(host: str) -> bool:
    return host.startswith("*")


def qualify(host: str, namespace: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """Istio's short-name rule: only a host without any dot is qualified with `namespace`."""
    host = normalize(host)
    if is_wildcard(host) or "." in host:
        return host
    return f"{host}.{namespace}.svc.{cluster_domain}"


def wildcard_matches(pattern: str, host: str) -> bool:
    """Whether wildcard `pattern` (`*`, `*.example.com`, `*x`) matches the concrete `host`."""
    return host.endswith(pattern[1:])


def specificity(pattern: str) -> tuple[int, str]:
    """Sort key putting the most specific wildcard first (longest suffix), then by name."""
    return (-len(pattern), pattern)


def expansions(name: str, from_namespace: str, cluster_domain: str) -> list[str]:
    """The Kubernetes search-path forms of `name` asked from `from_namespace`, most likely first.

    `svc` → `svc.<from_ns>.svc.<cd>`; `svc.ns` → `svc.ns.svc.<cd>`; `svc.ns.svc` → `+ .<cd>`.
    The name as given is always tried first by the caller (FQDNs and ServiceEntry hosts).
    """
    dots = name.count(".")
    suffix = f".svc.{cluster_domain}"
    if dots == 0:
        return [f"{name}.{from_namespace}{suffix}"]
    if dots == 1:
        return [f"{name}{suffix}"]
    if dots == 2 and name.endswith(".svc"):
        return [f"{name}.{cluster_domain}"]
    return []


def gateway_ref(gateway: str, namespace: str) -> str:
    """A VirtualService's `gateways` entry as `namespace/name`, or `mesh`.

    Istio accepts `name` (the VirtualService's namespace), `ns/name` and the older FQDN form
    `name.ns.svc.cluster.local`.
    """
    if gateway == MESH_GATEWAY or "/" in gateway:
        return gateway
    if "." in gateway:
        name, ns = gateway.split(".")[:2]
        return f"{ns}/{name}"
    return f"{namespace}/{gateway}"


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes matchLabels: every selector pair is in the labels (an empty one matches)."""
    return all(labels.get(k) == v for k, v in selector.items())
