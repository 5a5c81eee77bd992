"""Errors the HTTP proxy maps to responses."""

from __future__ import annotations


class UpstreamOverflow(Exception):
    """Raised by the pool or a connector when a circuit breaker refuses a new request (→ 503 UO)."""


class DownstreamError(Exception):
    """The client's side failed (disconnect, malformed body) while the proxy was reading it."""


class DownstreamProtocolError(DownstreamError):
    """The client's request body was malformed (framing): answered with `status` and a closed
    connection when no response was started, never forwarded further."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UpstreamDenied(Exception):
    """Raised by a connector when the destination's authorization policy refused the tunnel
    (its 403): the client gets 403 `RBAC: access denied`, not retried, not an outlier failure."""
