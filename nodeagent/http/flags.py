"""Envoy's response flags (access log `%RESPONSE_FLAGS%`) that the HTTP proxy sets."""

from __future__ import annotations

NO_ROUTE = "NR"  # no route for the request: 404
NO_CLUSTER = "NC"  # the route's destination (host or subset) does not exist: 503
NO_HEALTHY_UPSTREAM = "UH"  # no endpoint to send to: 503
UPSTREAM_CONNECT_FAILURE = "UF"  # connecting failed: 503
UPSTREAM_OVERFLOW = "UO"  # a circuit breaker refused the request: 503
UPSTREAM_RESET = "UR"  # the upstream reset/closed before a complete response: 503
UPSTREAM_TIMEOUT = "UT"  # route or per-try timeout: 504
UPSTREAM_RETRY_LIMIT = "URX"  # retries exhausted: the last try's result is returned
# Refused by authorization (L7 AuthorizationPolicy) or authentication (an invalid JWT). Envoy's
# RBAC filter sets no flag of its own (only response_code_details names the policy); this
# project marks every authorization refusal UAEX, as its L4 path already does, so a metric tells
# a refusal from an app's own 403/401.
UNAUTHORIZED = "UAEX"
DELAY_INJECTED = "DI"
FAULT_INJECTED = "FI"
DOWNSTREAM_PROTOCOL_ERROR = "DPE"  # malformed request: 400 (or 431, 505)
DOWNSTREAM_TERMINATION = "DC"  # the client went away before the response was complete: code 0
STREAM_IDLE_TIMEOUT = "SI"  # no byte either way for stream_idle_timeout: 408 (or a cut response)
# The request head did not complete within request_headers_timeout: 408. Envoy sets no flag of
# its own for this; DT ("a stream exceeded its maximum duration", also answered 408) is the
# nearest one, so logs and metrics still tell the timeout apart from others.
DURATION_TIMEOUT = "DT"
