"""The etcd JSON gateway's side of HTTP: JSON POSTs on keep-alive `nodeagent.httpclient`
connections.

The gateway answers unary calls with one JSON object and streams (`/v3/watch`) with a chunked
body of newline-delimited JSON objects (`JsonLines`). The connection, its errors (NotSent: safe
to retry anywhere; Lost: the server may have applied it; ProtocolError) and the parser live in
`nodeagent.httpclient`; this module adds only what etcd asks of a request. Timeouts are the
caller's (trio cancel scopes).
"""

from __future__ import annotations

import ssl

from nodeagent import httpclient
from nodeagent.httpclient import MAX_MESSAGE, JsonLines, Lost, NotSent, ProtocolError

# what the etcd backend takes from here
__all__ = ["MAX_MESSAGE", "HttpConnection", "JsonLines", "Lost", "NotSent", "ProtocolError"]


class HttpConnection(httpclient.HttpConnection):
    """One keep-alive connection to an etcd member; every request a JSON POST."""

    @classmethod
    async def connect(
        cls, host: str, port: int, host_header: str, ssl_context: ssl.SSLContext | None
    ) -> HttpConnection:
        return await cls.open(host, port, host_header=host_header, ssl_context=ssl_context)

    async def send_request(self, target: str, body: bytes, headers: list[tuple[str, str]]) -> None:
        """POST `body` as JSON; raises NotSent if any of it failed to go out."""
        await self.send("POST", target, [("Content-Type", "application/json"), *headers], body)
