"""Errors of the CNI endpoint: wire-protocol violations and enrollment failures.

Both carry a CNI error code, because each one ends as a CNI error JSON printed by the plugin
to the container runtime (codes 0-99 are the spec's well-known ones, 100+ are ours).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """CNI spec 1.1.0 "Well-known Error Codes", plus the mesh's own (100+)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    CONTAINER_UNKNOWN = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50
    # The agent could not enroll the pod (rules, listeners, registration).
    ENROLL_FAILED = 100
    # Anything unexpected inside the agent: a bug, reported rather than crashing the server.
    INTERNAL = 999


class EnrollError(Exception):
    """The handler refuses or fails a CNI command; becomes the plugin's CNI error as is."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def __repr__(self) -> str:
        return f"EnrollError({self.code}, {self.msg!r}, {self.details!r})"


class ProtocolError(Exception):
    """A malformed, oversized or wrong-version message on the CNI socket.

    `code` is the CNI code the peer is told (decode errors are 6, a version mismatch is 1).
    """

    def __init__(self, msg: str, code: int = ErrorCode.DECODE) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = int(code)
