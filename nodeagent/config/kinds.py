"""The registry of supported kinds: apiVersions, kubectl-style aliases, validators, store keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.config.schema import Validator, Walker
from nodeagent.config.validate import (
    destinationrule,
    gateway,
    reqauth,
    rollout,
    security,
    service,
    serviceentry,
    virtualservice,
)
from nodeagent.store import keys

NETWORKING = (
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
)
SECURITY = ("security.istio.io/v1beta1", "security.istio.io/v1")
WORKLOAD_API = "mesh.nodeagent.io/v1alpha1"


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    api_versions: tuple[str, ...]
    aliases: tuple[str, ...]
    spec: Validator
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # cross-field rules that need the document's namespace: (walker, spec, namespace)
    namespaced: Callable[[Walker, Any, str], None] | None = None

    @property
    def config_prefix(self) -> str:
        return f"{keys.CONFIG}{self.name}/"


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "Service",
            ("v1",),
            ("svc", "service", "services"),
            service.service_spec,
            service.normalize_service,
        ),
        Kind(
            "Workload",
            (WORKLOAD_API,),
            ("workload", "workloads", "wl"),
            service.workload_spec,
            service.normalize_workload,
        ),
        Kind(
            "VirtualService",
            NETWORKING,
            ("vs", "virtualservice", "virtualservices"),
            virtualservice.spec,
        ),
        Kind(
            "DestinationRule",
            NETWORKING,
            ("dr", "destinationrule", "destinationrules"),
            destinationrule.spec,
        ),
        Kind("Gateway", NETWORKING, ("gw", "gateway", "gateways"), gateway.spec),
        Kind(
            "ServiceEntry", NETWORKING, ("se", "serviceentry", "serviceentries"), serviceentry.spec
        ),
        Kind(
            "AuthorizationPolicy",
            SECURITY,
            ("ap", "authorizationpolicy", "authorizationpolicies"),
            security.authorization_policy_spec,
        ),
        Kind(
            "PeerAuthentication",
            SECURITY,
            ("pa", "peerauthentication", "peerauthentications"),
            security.peer_authentication_spec,
            security.normalize_peer_authentication,
        ),
        Kind(
            "RequestAuthentication",
            SECURITY,
            ("ra", "requestauthentication", "requestauthentications"),
            reqauth.request_authentication_spec,
            namespaced=reqauth.check_target_namespaces,
        ),
        Kind("Rollout", (WORKLOAD_API,), ("ro", "rollout", "rollouts"), rollout.spec),
    )
}

_ALIASES = {alias: kind for kind in KINDS.values() for alias in (*kind.aliases, kind.name.lower())}


class UnknownKind(ValueError):
    pass


def resolve(name: str) -> Kind:
    """A kind by its name or kubectl-style alias (case-insensitive), e.g. "svc", "vs", "dr"."""
    kind = _ALIASES.get(name.lower())
    if kind is None:
        known = ", ".join(sorted(KINDS))
        raise UnknownKind(f"kind {name} is not supported (supported: {known})")
    return kind


def store_key(kind: str, namespace: str, name: str, doc: dict[str, Any]) -> str:
    """Where a normalized document lives: Workloads by node and uid, the rest under config/."""
    if kind == "Workload":
        return keys.workload(doc["spec"]["node"], doc["metadata"]["uid"])
    return keys.config(kind, namespace, name)
