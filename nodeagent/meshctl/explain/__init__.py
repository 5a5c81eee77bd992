"""`meshctl explain`: what the mesh would do with one request, computed from the live config.

One snapshot is built from the store with the agent's own builder, then the agent's own pure
decisions are asked, in the order the data path asks them: the pod's DNS (`nodeagent.dns.resolve`)
turns the URL's host into a service, `find_address` gives the service port and its protocol,
`routing.route_http` (HTTP) or `routing.route_tcp` (TCP) picks the VirtualService rule and its
weighted destinations, `snapshot.endpoints` lists each destination's endpoints, and for each
endpoint's workload `peer_authentication_for` and `proxy.inbound.tunnel_decision` give the mTLS
mode and the authorization verdict. Nothing here re-implements a decision: when explain and the
proxy disagree, the bug is in the shared code, not in two copies.

Modules: `inputs` (target URL, headers, the caller), `resolve` (`explain(snapshot, ...)`, pure,
returns a JSON-able report), `describe` (how each piece of the report is described),
`rendering` (`render(report)`, for people) and `command` (`run(args, out, err)`, the
subcommand: store I/O, exit status).
"""

from __future__ import annotations

from nodeagent.meshctl.explain.command import add_parser, load_snapshot, run
from nodeagent.meshctl.explain.describe import describe_match
from nodeagent.meshctl.explain.inputs import ExplainError, Target, parse_headers, parse_target
from nodeagent.meshctl.explain.rendering import render
from nodeagent.meshctl.explain.resolve import explain

__all__ = [
    "ExplainError",
    "Target",
    "add_parser",
    "describe_match",
    "explain",
    "load_snapshot",
    "parse_headers",
    "parse_target",
    "render",
    "run",
]
