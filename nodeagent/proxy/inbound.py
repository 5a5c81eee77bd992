"""The inbound decisions (pure): may this connection be delivered to the pod's app?

`plaintext_decision` is for 15006 (no client certificate): PeerAuthentication first (STRICT
refuses, PERMISSIVE and DISABLE accept; `snap.peer_authentication_for` resolves mesh-wide,
namespace, selector and port-level modes), then L4 authorization with no source identity.
`tunnel_decision` is for 15008 after the client's certificate verified: authorization only.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.authz import Connection, authorize
from nodeagent.snapshot import Snapshot, Workload


@dataclass(frozen=True, slots=True)
class InboundDecision:
    allowed: bool
    reason: str
    policy: str | None = None  # the AuthorizationPolicy (or PeerAuthentication mode) deciding
    audited: tuple[str, ...] = ()


def plaintext_decision(
    snap: Snapshot, workload: Workload, src_ip: str, dst_ip: str, port: int
) -> InboundDecision:
    mode = snap.peer_authentication_for(workload, port)
    if mode == "STRICT":
        return InboundDecision(False, "PeerAuthentication STRICT: plaintext refused")
    return _authorize(snap, workload, Connection(src_ip, dst_ip, port, None), f"mtls={mode}")


def tunnel_decision(
    snap: Snapshot, workload: Workload, src_ip: str, dst_ip: str, port: int, identity: str
) -> InboundDecision:
    return _authorize(snap, workload, Connection(src_ip, dst_ip, port, identity), "mtls")


def _authorize(
    snap: Snapshot, workload: Workload, conn: Connection, prefix: str
) -> InboundDecision:
    result = authorize(snap.authorization_policies_for(workload), conn)
    return InboundDecision(
        result.allowed, f"{prefix}; {result.reason}", result.policy, result.audited
    )
