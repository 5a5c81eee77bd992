"""The HTTP/1.1 proxy's hand-off for a request whose upstream speaks HTTP/2 (its destination
port declares `http2`/`grpc`/`h2c`: `nodeagent.http2.selection`): the HTTP/1.1 proxy has only
HTTP/1.1 upstreams, so once a request is routed there (the ingress gateway's HTTP/1.1 clients,
a route to a service of another protocol than the addressed port's), an injected `Bridge` (the
HTTP/2 proxy's, `nodeagent.http2.proxy.Http1Bridge`) forwards it, translated, and answers the
client in HTTP/1.1.
"""

from __future__ import annotations

from typing import Protocol

from nodeagent.http.downstream import Downstream
from nodeagent.http.log import RequestLog
from nodeagent.routing import HttpRequest, RouteDecision, RouteDestination


class Bridge(Protocol):
    def takes(self, dest: RouteDestination) -> bool:
        """Whether `dest`'s upstream is not HTTP/1.1 (pure, no I/O: asked per request)."""
        ...

    async def forward(
        self,
        down: Downstream,
        request: HttpRequest,
        headers: list[tuple[str, str]],
        decision: RouteDecision,
        dest: RouteDestination,
        entry: RequestLog,
        client_address: str | None,
        source_ns: str | None,
    ) -> bool:
        """Forward the routed request and answer the client; whether its connection can serve
        another request."""
        ...
