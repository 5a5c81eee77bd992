"""The inbound decisions (pure) and the registry of the pod's open inbound connections.

`plaintext_decision` is for 15006 (no client certificate): PeerAuthentication first (STRICT
refuses, PERMISSIVE and DISABLE accept; `snap.peer_authentication_for` resolves mesh-wide,
namespace, selector and port-level modes), then L4 authorization with no source identity.
`tunnel_decision` is for 15008 after the client's certificate verified: authorization only.
`parses_requests` says whether the destination takes an HTTP port's stream at L7 or relays it
(`--destination-l7`, or the pod's own `mesh.nodeagent.io/destination-l7` annotation).

Policy applies to connections already open, not only to new ones (ztunnel's connection manager
and policy watcher): `LiveConnections` holds what was verified when each connection was accepted
(`Peer`), and `sweep` re-runs the same decision (`accept_decision`) against a newer snapshot, and
optionally the peer certificate against the revocation list, closing the ones now denied. The
registry does no I/O itself: each entry carries the callback that aborts its connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from nodeagent.authz import Connection, authorize, reads_requests
from nodeagent.identity.api import PeerRejected
from nodeagent.snapshot import Snapshot, Workload

# Whether the destination agent parses the requests of an HTTP port that came through the
# tunnel: "always" (every request: destination telemetry, server spans, XFCC), or "when-needed"
# (only when the source did not report them itself, or a policy of the workload reads them).
DestinationL7 = Literal["always", "when-needed"]
DESTINATION_L7_MODES: tuple[DestinationL7, ...] = get_args(DestinationL7)
# A pod's own choice, over the agent's flag (read from its Workload, so every worker and every
# agent restart sees the same one).
DESTINATION_L7_ANNOTATION = "mesh.nodeagent.io/destination-l7"


def destination_l7_annotation(annotations: Mapping[str, str]) -> DestinationL7 | None:
    """The pod's `mesh.nodeagent.io/destination-l7`, or None when it has none.

    Raises ValueError naming the annotation for any other value: enrollment refuses such a pod
    (the CNI ADD fails with INVALID_CONFIG) rather than guess what its author meant."""
    raw = annotations.get(DESTINATION_L7_ANNOTATION)
    if raw is None:
        return None
    for mode in DESTINATION_L7_MODES:
        if raw.strip() == mode:
            return mode
    expected = " or ".join(repr(m) for m in DESTINATION_L7_MODES)
    raise ValueError(f"annotation {DESTINATION_L7_ANNOTATION}={raw[:64]!r}: expected {expected}")


def destination_l7_of(annotations: Mapping[str, str], default: DestinationL7) -> DestinationL7:
    """The mode for a workload's HTTP ports: its annotation, else the agent's `default`.

    A value enrollment would have refused (a Workload the store got from elsewhere) counts as
    "always": parsing every request loses nothing that policy or telemetry needs."""
    try:
        return destination_l7_annotation(annotations) or default
    except ValueError:
        return "always"


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


def parses_requests(
    snap: Snapshot, workload: Workload, *, mode: DestinationL7, source_reported: bool
) -> bool:
    """Whether the destination parses a tunnelled stream to one of `workload`'s HTTP ports.

    `mode` is the agent's; the workload's annotation, when it has one, decides instead
    (`destination_l7_of`). "when-needed" relays it at L4 only when nothing is lost for policy:
    the source agent's L7 proxy opened the stream (it reports every request on it: metrics,
    access log, CLIENT span), and no AuthorizationPolicy of the workload has a field only
    requests have (paths, methods, request principals, request.* conditions, …) and no
    RequestAuthentication selects it. A policy gaining such a field later closes the stream at
    the live re-check (L7 fields fail closed at L4), and the stream opened next is parsed."""
    if destination_l7_of(workload.annotations, mode) == "always" or not source_reported:
        return True
    return _policy_reads_requests(snap, workload)


def _policy_reads_requests(snap: Snapshot, workload: Workload) -> bool:
    """A RequestAuthentication selects `workload`, or one of its AuthorizationPolicies has a
    field only requests have."""
    if snap.request_authentication_for(workload):
        return True
    policies = snap.authorization_policies_for(workload)
    return any(map(reads_requests, (*policies.allow, *policies.deny, *policies.audit)))


# -- open connections ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """What the accept path verified about one inbound connection."""

    src_ip: str
    dst_ip: str
    port: int  # the app's (target) port
    identity: str | None = None  # the verified SPIFFE id (15008); None for plaintext (15006)
    certificate: bytes = b""  # the client's certificate (DER), 15008 only
    src_port: int = 0
    # An HTTP port (the destination parses it): each request is authorized on its own, so the
    # connection itself is held only to PeerAuthentication (and its certificate).
    http: bool = False
    # An HTTP port relayed at L4 (`--destination-l7 when-needed`: the source reports its
    # requests): closed once a policy reads them, so the stream opened next is parsed.
    deferred_http: bool = False


def accept_decision(snap: Snapshot, workload: Workload, peer: Peer) -> InboundDecision:
    """The accept-time decision for `peer`, against `snap`: the same pure functions."""
    if peer.deferred_http:
        if destination_l7_of(workload.annotations, "when-needed") == "always":
            return InboundDecision(
                False, f"{DESTINATION_L7_ANNOTATION} is now 'always' for this workload: reconnect"
            )
        if _policy_reads_requests(snap, workload):
            return InboundDecision(False, "a policy now reads this HTTP port's requests: reconnect")
    if peer.http:
        if peer.identity is None and snap.peer_authentication_for(workload, peer.port) == "STRICT":
            return InboundDecision(False, "PeerAuthentication STRICT: plaintext refused")
        return InboundDecision(True, "HTTP port: every request is authorized")
    if peer.identity is None:
        return plaintext_decision(snap, workload, peer.src_ip, peer.dst_ip, peer.port)
    return tunnel_decision(snap, workload, peer.src_ip, peer.dst_ip, peer.port, peer.identity)


PeerCheck = Callable[[bytes], object]  # raises (e.g. PeerRejected) when the certificate is revoked


@dataclass(slots=True, eq=False)
class LiveConnection:
    """One open inbound connection. `close(decision)` must abort it without blocking."""

    cid: int
    peer: Peer
    close: Callable[[InboundDecision], None]
    closed_by: InboundDecision | None = field(default=None)


@dataclass(slots=True)
class Closed:
    conn: LiveConnection
    decision: InboundDecision
    cause: str  # "policy" (authorization / PeerAuthentication) or "revoked"


class LiveConnections:
    """The pod's open inbound connections (15006 and 15008), re-checked on policy changes."""

    def __init__(self) -> None:
        self._conns: dict[int, LiveConnection] = {}
        self.closed_by_policy = 0  # connections closed after they were accepted

    def __len__(self) -> int:
        return len(self._conns)

    def add(self, conn: LiveConnection) -> None:
        self._conns[conn.cid] = conn

    def remove(self, conn: LiveConnection) -> None:
        self._conns.pop(conn.cid, None)

    def check(
        self,
        conn: LiveConnection,
        snap: Snapshot,
        workload: Workload,
        peer_check: PeerCheck | None = None,
    ) -> Closed | None:
        """Re-evaluate one connection; close it (once) when it is now denied."""
        if conn.closed_by is not None:
            return None
        closed = _recheck(conn.peer, snap, workload, peer_check)
        if closed is None:
            return None
        decision, cause = closed
        conn.closed_by = decision
        self.closed_by_policy += 1
        self.remove(conn)
        conn.close(decision)
        return Closed(conn, decision, cause)

    def sweep(
        self, snap: Snapshot, workload: Workload, peer_check: PeerCheck | None = None
    ) -> list[Closed]:
        """Re-evaluate every open connection against `snap` (and, with `peer_check`, its peer
        certificate); close and return the ones now denied."""
        out = []
        for conn in list(self._conns.values()):
            closed = self.check(conn, snap, workload, peer_check)
            if closed is not None:
                out.append(closed)
        return out


def _recheck(
    peer: Peer, snap: Snapshot, workload: Workload, peer_check: PeerCheck | None
) -> tuple[InboundDecision, str] | None:
    if peer_check is not None and peer.certificate:
        try:
            peer_check(peer.certificate)
        except (PeerRejected, ValueError) as exc:  # revoked, or no longer parses
            return InboundDecision(False, f"peer certificate rejected: {exc}", "revoked"), "revoked"
    decision = accept_decision(snap, workload, peer)
    if decision.allowed:
        return None
    return decision, "policy"
