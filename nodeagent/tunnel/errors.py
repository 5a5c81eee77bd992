"""Tunnel errors: a short machine-readable flag for logs and counters, and a readable message."""

from __future__ import annotations


class TunnelError(Exception):
    def __init__(self, flag: str, msg: str) -> None:
        super().__init__(msg)
        self.flag = flag  # e.g. connect_failed, tls_failed, identity_mismatch, refused
        self.msg = msg

    def __str__(self) -> str:
        return self.msg
