"""Errors of the balancing engine: a policy that does not parse, and no endpoint to pick."""

from __future__ import annotations


class BalanceError(Exception):
    """Base class for the balancing engine's errors."""


class PolicyError(BalanceError, ValueError):
    """A DestinationRule trafficPolicy field that cannot be used; names the field's path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class NoHealthyUpstream(BalanceError):
    """No endpoint may be picked (none at all, or none healthy with panic mode disabled).

    The proxy answers 503 with Envoy's response flag UH (L4: closes the connection).
    """

    status = 503
    flag = "UH"

    def __init__(self, cluster: str, total: int) -> None:
        why = "no endpoints" if total == 0 else f"all {total} endpoints ejected, panic disabled"
        super().__init__(f"no healthy upstream for {cluster}: {why}")
        self.cluster = cluster
        self.total = total
