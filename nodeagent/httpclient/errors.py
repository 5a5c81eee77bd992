"""The client's errors: one base the callers translate, split by whether a retry is safe.

`NotSent`: the request never reached the server in full (connect, TLS handshake or send failed),
so sending it again cannot apply it twice. `Lost`: the connection failed after the request went
out, so the server may have acted on it. `ProtocolError`: the server answered with something
that is not HTTP (or not the JSON lines expected), or more than a size bound allows.
Messages say what failed and why; the caller adds where (method, URL, endpoint).
"""

from __future__ import annotations


class HttpClientError(Exception):
    """A request on an `HttpConnection` failed."""


class NotSent(HttpClientError):
    """The request did not reach the server in full: retrying cannot apply it twice."""


class ConnectError(NotSent):
    """The TCP connect failed; `reason` is the OS's words, for callers that name the target."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"connect: {reason}")
        self.reason = reason


class Lost(HttpClientError):
    """The connection failed after the request was sent: the server may have applied it."""


class ProtocolError(HttpClientError):
    """The server sent something that is not the HTTP/JSON expected, or too much of it."""
