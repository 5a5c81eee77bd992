"""Tunnel errors: a short machine-readable flag for logs and counters, and a readable message."""

from __future__ import annotations


class TunnelError(Exception):
    def __init__(self, flag: str, msg: str) -> None:
        super().__init__(msg)
        # e.g. connect_failed, tls_failed, identity_mismatch, connection_failed (the pooled
        # connection died before a status), denied (the server's 401: its authorization policy
        # refused us; callers must not treat it as an unhealthy endpoint), bad_request (400),
        # unavailable (503), refused (any other status), stream_refused (never processed: the
        # CONNECT crossed the server's GOAWAY, or got REFUSED_STREAM; safe to retry)
        self.flag = flag
        self.msg = msg

    @property
    def denied(self) -> bool:
        """The destination's policy refused the stream (status 401)."""
        return self.flag == DENIED

    def __str__(self) -> str:
        return self.msg


DENIED = "denied"
STREAM_REFUSED = "stream_refused"
