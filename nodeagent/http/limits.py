"""The HTTP proxy's bounds: header sizes, buffers, timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    max_headers: int = 100
    retry_buffer_bytes: int = 64 * 1024
    # Keep-alive: the first byte of the next request must come within this (then a silent
    # close: no request was started).
    idle_timeout: float = 60.0
    # From a request head's first byte to its end (a header trickle): 408 and a close, flag DT.
    # Envoy leaves its request_headers_timeout off; docs/l7.md says why this is 10 s.
    request_headers_timeout: float = 10.0
    # No byte either way (request body, upstream response) for this long: 408 SI if no
    # response was started, else the response is cut (flag SI). Envoy's default: 5 min.
    stream_idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_idle_per_endpoint: int = 16
    read_size: int = 64 * 1024
    mirror_timeout: float = 10.0
