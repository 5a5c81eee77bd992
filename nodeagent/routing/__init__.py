"""L7 (HTTP) and L4 (TCP) routing decisions: pure functions of (snapshot, source, request).

`decide()` applies the VirtualServices for a request's host (rules in order, first match wins),
resolves the chosen destination to a service, a DestinationRule subset and a port, and returns a
`Decision` the byte mover (`nodeagent.http`) executes; `decide_tcp()` does the same for TCP routes.
Nothing here does I/O, awaits or keeps state; randomness (weights, fault and mirror percentages)
comes from a supplied `rand()` so tests are deterministic.
"""

from nodeagent.routing.decide import decide, decide_tcp
from nodeagent.routing.model import (
    Decision,
    Fault,
    MatchedRule,
    Redirect,
    Request,
    RouteDestination,
    Source,
    TcpDecision,
    TcpRequest,
)
from nodeagent.snapshot.routes import DirectResponse, HeaderOps, RetryPolicy

__all__ = [
    "Decision",
    "DirectResponse",
    "Fault",
    "HeaderOps",
    "MatchedRule",
    "Redirect",
    "Request",
    "RetryPolicy",
    "RouteDestination",
    "Source",
    "TcpDecision",
    "TcpRequest",
    "decide",
    "decide_tcp",
]
