"""The HTTP proxy's bounds: header sizes, buffers, timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    max_headers: int = 100
    retry_buffer_bytes: int = 64 * 1024
    header_timeout: float = 60.0  # to receive a complete request head (also keep-alive idle)
    connect_timeout: float = 10.0
    max_idle_per_endpoint: int = 16
    read_size: int = 64 * 1024
    mirror_timeout: float = 10.0
