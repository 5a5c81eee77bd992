"""The agent's view of the mesh: an immutable, indexed Snapshot, built from store documents.

`SnapshotBuilder` (pure) turns store events into the next `Snapshot`, incrementally;
`SnapshotSync` (trio) feeds it from the store's watch and swaps `sync.current`, which the proxy,
DNS, routing and authorization read synchronously: `snap.find_address(ip, port)`,
`snap.resolve_host(name, ns)`, `snap.routes_for(host)`, `snap.destination_rule(host)`,
`snap.authorization_policies_for(workload)`, `snap.peer_authentication_for(workload, port)`,
`snap.request_authentication_for(workload)`.
See docs/snapshot.md.
"""

from __future__ import annotations

from nodeagent.snapshot.builder import SnapshotBuilder
from nodeagent.snapshot.errors import CacheError, ConvertError, SnapshotError
from nodeagent.snapshot.model import (
    HEALTHY,
    UNHEALTHY,
    AuthorizationPolicies,
    AuthorizationPolicy,
    DestinationRule,
    Endpoint,
    Gateway,
    L7Protocol,
    MtlsMode,
    PeerAuthentication,
    Service,
    ServicePort,
    ServiceTarget,
    StaticEndpoint,
    Subset,
    VirtualService,
    Workload,
    WorkloadStatus,
)
from nodeagent.snapshot.snapshot import Indexes, Snapshot
from nodeagent.snapshot.sync import SnapshotSync

__all__ = [
    "HEALTHY",
    "UNHEALTHY",
    "AuthorizationPolicies",
    "AuthorizationPolicy",
    "CacheError",
    "ConvertError",
    "DestinationRule",
    "Endpoint",
    "Gateway",
    "Indexes",
    "L7Protocol",
    "MtlsMode",
    "PeerAuthentication",
    "Service",
    "ServicePort",
    "ServiceTarget",
    "Snapshot",
    "SnapshotBuilder",
    "SnapshotError",
    "SnapshotSync",
    "StaticEndpoint",
    "Subset",
    "VirtualService",
    "Workload",
    "WorkloadStatus",
]
