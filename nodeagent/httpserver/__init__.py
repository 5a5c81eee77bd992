"""The project's one small HTTP/1.1 server: h11 over trio, bounded, on a unix socket or a TCP port.

Handlers are plain sync functions returning a `Response`; the server owns parsing, method checks
and error mapping. Used by the admin socket (`nodeagent.admin`, unix socket mode 0600) and the
node's telemetry port (`nodeagent.telemetry.server`, TCP 15020). Nothing here knows what the
agent is, so both sit above it.
"""

from nodeagent.httpserver.server import (
    Handler,
    HttpServer,
    HttpServerRequest,
    Response,
    Route,
    Routes,
    TcpHttpServer,
    UnixSocketHttpServer,
)

__all__ = [
    "Handler",
    "HttpServer",
    "HttpServerRequest",
    "Response",
    "Route",
    "Routes",
    "TcpHttpServer",
    "UnixSocketHttpServer",
]
