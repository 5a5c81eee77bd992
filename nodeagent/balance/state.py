"""Per-endpoint mutable state (the handle a pick returns), request outcomes, the pick context.

An `EndpointState` lives as long as its address stays in the cluster: a snapshot update that keeps
the address keeps its in-flight count, latency estimate and ejection history. The caller brackets
each request (L7) or connection (L4) with `start()` and `finish(latency_s, outcome)`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from nodeagent.snapshot.model import Endpoint

if TYPE_CHECKING:
    from nodeagent.balance.picker import Picker


class Outcome(enum.Enum):
    """How one request or connection ended, as outlier detection counts it."""

    SUCCESS = "success"  # any non-5xx response, or a TCP connection that was established
    ERROR_5XX = "5xx"  # 500, 501, 505…: counts toward consecutive5xxErrors only
    GATEWAY_ERROR = "gateway"  # 502, 503, 504: both detectors
    # Local-origin failures count as a 503 (Envoy without split_external_local_origin_errors,
    # which Istio does not enable): both detectors, as Istio documents for opaque TCP.
    CONNECT_FAILURE = "connect_failure"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"  # the client went away: says nothing about the endpoint

    @staticmethod
    def from_status(status: int) -> Outcome:
        if status in (502, 503, 504):
            return Outcome.GATEWAY_ERROR
        if 500 <= status <= 599:
            return Outcome.ERROR_5XX
        return Outcome.SUCCESS


GATEWAY_LIKE = frozenset([Outcome.GATEWAY_ERROR, Outcome.CONNECT_FAILURE, Outcome.TIMEOUT])


class PickContext:
    """What a consistent-hash balancer may hash on; all optional, cheap to build per request.

    `headers` has lower-case names. `cookies`/`query` are parsed from `headers["cookie"]` and
    `path` when not given. `hash_key` overrides the policy's source. `original_dst` is the
    address the client asked for (PASSTHROUGH).
    """

    __slots__ = ("cookies", "hash_key", "headers", "original_dst", "path", "query", "source_ip")

    def __init__(
        self,
        *,
        source_ip: str | None = None,
        headers: Mapping[str, str] | None = None,
        cookies: Mapping[str, str] | None = None,
        path: str | None = None,
        query: Mapping[str, str] | None = None,
        hash_key: str | None = None,
        original_dst: tuple[str, int] | None = None,
    ) -> None:
        self.source_ip = source_ip
        self.headers = headers
        self.cookies = cookies
        self.path = path
        self.query = query
        self.hash_key = hash_key
        self.original_dst = original_dst


NO_CONTEXT = PickContext()


class EndpointState:
    """One endpoint's live state in one cluster, and the handle `Picker.pick` returns."""

    __slots__ = (
        "available",
        "consecutive_5xx",
        "consecutive_gateway",
        "eject_backoff",
        "ejected",
        "ejected_at",
        "ejections",
        "endpoint",
        "failures",
        "in_flight",
        "key",
        "picked_at",
        "picker",
        "requests",
        "rtt",
        "rtt_at",
        "rtt_measured",
        "rtt_peak",
        "unejected_at",
    )

    def __init__(self, endpoint: Endpoint, picker: Picker | None, rtt: float, now: float) -> None:
        self.endpoint = endpoint
        self.key = f"{endpoint.address}:{endpoint.port}"
        self.picker = picker
        self.in_flight = 0
        self.rtt = rtt  # peak-EWMA estimate, seconds
        self.rtt_at = now
        self.rtt_measured = False  # `rtt` is still the default guess
        self.rtt_peak = 0.0  # a sample above `rtt` waiting for the next to confirm it
        self.available = True  # in the set picks are made from (healthy, or all in panic)
        self.ejected = False
        self.ejected_at = 0.0
        self.unejected_at: float | None = None
        self.eject_backoff = 0  # Envoy's ejection-time multiplier
        self.ejections = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.requests = 0
        self.failures = 0
        self.picked_at = 0  # the picker's pick count when this endpoint was last picked

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def port(self) -> int:
        return self.endpoint.port

    def start(self) -> None:
        """A request (or connection) to this endpoint begins."""
        self.in_flight += 1

    def finish(self, latency_s: float, outcome: Outcome = Outcome.SUCCESS) -> None:
        """It ended: `latency_s` is the response time (L4: the connect time)."""
        if self.in_flight > 0:
            self.in_flight -= 1
        if self.picker is not None:
            self.picker.record(self, latency_s, outcome)

    def __repr__(self) -> str:
        flags = " ejected" if self.ejected else ""
        return f"<EndpointState {self.key} in_flight={self.in_flight} rtt={self.rtt:.4f}{flags}>"


Clock = Callable[[], float]
