"""Tunnel errors: a short machine-readable flag for logs and counters, and a readable message."""

from __future__ import annotations


class TunnelError(Exception):
    def __init__(self, flag: str, msg: str) -> None:
        super().__init__(msg)
        # e.g. connect_failed, tls_failed, identity_mismatch, refused (a non-OK status other
        # than 403, or closed before any status), denied (the server's 403: its authorization
        # policy refused us; callers must not treat it as an unhealthy endpoint)
        self.flag = flag
        self.msg = msg

    @property
    def denied(self) -> bool:
        """The destination's policy refused the tunnel (status 403)."""
        return self.flag == DENIED

    def __str__(self) -> str:
        return self.msg


DENIED = "denied"
