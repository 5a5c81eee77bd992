"""gRPC's protocol facts the L7 proxies decide with (pure): status codes and their names, the
mappings between gRPC and HTTP statuses Envoy uses, the `grpc-timeout` header, and which
requests are gRPC at all (`content-type: application/grpc…`). Which statuses `retryOn` names is
the compiled route's rule (`snapshot.routes.RetryPolicy.retriable_grpc`)."""

from __future__ import annotations

import enum


class GrpcStatus(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# Envoy's Grpc::Utility::grpcToHttpStatus: what a gRPC status counts as for outlier detection
# and the `response_code` of a gRPC answer that carries no HTTP error of its own.
_GRPC_TO_HTTP = {
    GrpcStatus.OK: 200,
    GrpcStatus.CANCELLED: 499,
    GrpcStatus.UNKNOWN: 500,
    GrpcStatus.INVALID_ARGUMENT: 400,
    GrpcStatus.DEADLINE_EXCEEDED: 504,
    GrpcStatus.NOT_FOUND: 404,
    GrpcStatus.ALREADY_EXISTS: 409,
    GrpcStatus.PERMISSION_DENIED: 403,
    GrpcStatus.RESOURCE_EXHAUSTED: 429,
    GrpcStatus.FAILED_PRECONDITION: 400,
    GrpcStatus.ABORTED: 409,
    GrpcStatus.OUT_OF_RANGE: 400,
    GrpcStatus.UNIMPLEMENTED: 501,
    GrpcStatus.INTERNAL: 500,
    GrpcStatus.UNAVAILABLE: 503,
    GrpcStatus.DATA_LOSS: 500,
    GrpcStatus.UNAUTHENTICATED: 401,
}

GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_to_http_status(status: int) -> int:
    """Envoy's mapping (unknown codes: 500)."""
    try:
        return _GRPC_TO_HTTP[GrpcStatus(status)]
    except ValueError:
        return 500


def http_to_grpc_status(status: int, *, timed_out: bool = False) -> GrpcStatus:
    """The gRPC status a mesh-generated HTTP error is answered with to a gRPC client (Envoy's
    Grpc::Utility::httpToGrpcStatus). One deviation, as issue 16 asks: a route or per-try timeout
    (`timed_out`, a 504 UT) is DEADLINE_EXCEEDED, where Envoy says UNAVAILABLE."""
    if timed_out:
        return GrpcStatus.DEADLINE_EXCEEDED
    if status == 400:
        return GrpcStatus.INTERNAL
    if status == 401:
        return GrpcStatus.UNAUTHENTICATED
    if status == 403:
        return GrpcStatus.PERMISSION_DENIED
    if status == 404:
        return GrpcStatus.UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return GrpcStatus.UNAVAILABLE
    return GrpcStatus.UNKNOWN


def is_grpc(content_type: str | None) -> bool:
    """`application/grpc`, `application/grpc+proto`, `application/grpc-web…` (case-insensitive)."""
    return content_type is not None and content_type.lower().startswith("application/grpc")


def parse_grpc_timeout(value: str | None) -> float | None:
    """`grpc-timeout` (1-8 digits and a unit H M S m u n) in seconds; None when absent or
    malformed (a malformed one is ignored, as gRPC servers do)."""
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1]
    if not digits.isdigit() or unit not in GRPC_TIMEOUT_UNITS:
        return None
    return int(digits) * GRPC_TIMEOUT_UNITS[unit]


def parse_grpc_status(value: str | bytes | None) -> int | None:
    """The `grpc-status` value, None when absent or not a number."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 3 else None
