"""L4 AuthorizationPolicy evaluation (pure): does this connection reach this workload?

`authorize(policies, conn)` takes the policies the snapshot selects for the destination workload
(`snap.authorization_policies_for(workload)`) and the connection's L4 attributes, and returns a
`AuthzDecision`. Semantics follow ztunnel's `rbac.rs`; see docs/dataplane.md.
"""

from __future__ import annotations

from nodeagent.authz.evaluate import AuthzDecision, Connection, authorize

__all__ = ["AuthzDecision", "Connection", "authorize"]
