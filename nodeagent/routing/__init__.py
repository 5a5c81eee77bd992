"""L7 (HTTP) and L4 (TCP) routing decisions: pure functions of (snapshot, source, request).

`route_http()` applies the VirtualServices for a request's host (rules in order, first match
wins), resolves the chosen destination to a service, a DestinationRule subset and a port, and
returns a `RouteDecision` the byte mover (`nodeagent.http`) executes; `route_tcp()` does the same
for TCP routes, `route_tls()` for TLS connections passed through by SNI. The rules were
compiled with the snapshot (`nodeagent.snapshot.routes`); matching is `match.py`, the decision
`decide.py`.
Nothing here does I/O, awaits or keeps state; randomness (weights, fault and mirror percentages)
comes from a supplied `rand()` so tests are deterministic.
"""

from nodeagent.routing.decide import route_http, route_tcp, route_tls
from nodeagent.routing.model import (
    Fault,
    HttpRequest,
    MatchedRule,
    Redirect,
    RouteDecision,
    RouteDestination,
    Source,
    TcpRequest,
    TcpRouteDecision,
    TlsRequest,
)
from nodeagent.snapshot.routes import DirectResponse, HeaderOps, RetryPolicy

__all__ = [
    "DirectResponse",
    "Fault",
    "HeaderOps",
    "HttpRequest",
    "MatchedRule",
    "Redirect",
    "RetryPolicy",
    "RouteDecision",
    "RouteDestination",
    "Source",
    "TcpRequest",
    "TcpRouteDecision",
    "TlsRequest",
    "route_http",
    "route_tcp",
    "route_tls",
]
