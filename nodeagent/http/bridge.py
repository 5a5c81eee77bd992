"""The HTTP/1.1 proxy's hand-off for a request whose upstream speaks HTTP/2 (its destination
port declares `http2`/`grpc`/`h2c`: `nodeagent.http2.selection`): the HTTP/1.1 proxy has only
HTTP/1.1 upstreams, so once a request is routed there (the ingress gateway's HTTP/1.1 clients,
a route to a service of another protocol than the addressed port's), an injected `Bridge` (the
HTTP/2 proxy's `forward_http1`) forwards it, translated, and answers the client in HTTP/1.1.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nodeagent.http.downstream import Downstream
from nodeagent.http.log import RequestLog
from nodeagent.routing import HttpRequest, RouteDecision, RouteDestination

# (client, the request as routed, its headers, the decision, its destination, its record,
# x-forwarded-for's address, the source namespace) → whether the client connection can serve
# another request, or None: not for the bridge (the destination's upstream is HTTP/1.1).
Bridge = Callable[
    [
        Downstream,
        HttpRequest,
        list[tuple[str, str]],
        RouteDecision,
        RouteDestination,
        RequestLog,
        "str | None",
        "str | None",
    ],
    Awaitable["bool | None"],
]
