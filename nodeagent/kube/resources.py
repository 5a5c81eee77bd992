"""The Kubernetes resources kube-sync mirrors, with their API paths, and where they land.

Istio kinds, the mesh's Rollouts and Services become the same documents `meshctl apply` writes
(`/mesh/v1/config/<Kind>/<ns>/<name>`); EndpointSlices and Pods are not mesh config and get
their own prefix, `/mesh/v1/kube/` (`store.keys.KUBE`), owned by kube-sync alone (the agent's pod
metadata source reads Pods there, the snapshot EndpointSlices).
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.store import keys


@dataclass(frozen=True, slots=True)
class ResourceType:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is None:
            return f"{base}/{self.plural}"
        return f"{base}/namespaces/{namespace}/{self.plural}"

    @property
    def store_prefix(self) -> str:
        if self.kind == "Pod":
            return keys.KUBE_PODS
        if self.kind == "EndpointSlice":
            return keys.KUBE_ENDPOINT_SLICES
        return f"{keys.CONFIG}{self.kind}/"


SERVICE = ResourceType("Service", "", "v1", "services")
ENDPOINT_SLICE = ResourceType("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices")
POD = ResourceType("Pod", "", "v1", "pods")
ISTIO = (
    ResourceType("VirtualService", "networking.istio.io", "v1", "virtualservices"),
    ResourceType("DestinationRule", "networking.istio.io", "v1", "destinationrules"),
    ResourceType("Gateway", "networking.istio.io", "v1", "gateways"),
    ResourceType("ServiceEntry", "networking.istio.io", "v1", "serviceentries"),
    ResourceType("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies"),
    ResourceType("PeerAuthentication", "security.istio.io", "v1", "peerauthentications"),
    ResourceType("RequestAuthentication", "security.istio.io", "v1", "requestauthentications"),
)
# The mesh's own kinds (mesh.nodeagent.io); the Workload kind is the agents' own, not mirrored.
MESH = (ResourceType("Rollout", "mesh.nodeagent.io", "v1alpha1", "rollouts"),)
ALL = (SERVICE, ENDPOINT_SLICE, POD, *ISTIO, *MESH)
BY_KIND = {r.kind: r for r in ALL}

LEASE = ResourceType("Lease", "coordination.k8s.io", "v1", "leases")
