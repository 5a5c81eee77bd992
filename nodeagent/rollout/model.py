"""A validated Rollout document compiled once into frozen dataclasses the controller reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nodeagent.config.duration import seconds
from nodeagent.config.validate.common import fqdn

WebhookType = Literal["pre-rollout", "rollout", "post-rollout"]
DEFAULT_WEBHOOK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class MetricCheck:
    name: str  # request-success-rate | request-duration
    minimum: float | None
    maximum: float | None

    def passes(self, value: float) -> bool:
        if self.minimum is not None and value < self.minimum:
            return False
        return self.maximum is None or value <= self.maximum


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    type: WebhookType
    url: str
    timeout: float
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Rollout:
    namespace: str
    name: str
    host: str  # as written (a short name resolves in the Rollout's namespace)
    fqdn: str
    virtual_service: str
    route: str | None  # the http route's name; None: the first one routing to the host
    destination_rule: str
    stable: str
    canary: str
    promotion: Literal["canary", "stableLabels"]
    interval: float
    threshold: int
    steps: tuple[int, ...]  # canary weights in order; empty for an A/B experiment
    iterations: int  # A/B only; 0 for a canary
    match: tuple[dict[str, Any], ...]
    min_requests: int  # 0: no data in an interval is a failed check
    metrics: tuple[MetricCheck, ...]
    webhooks: tuple[Webhook, ...]

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def is_ab(self) -> bool:
        return self.iterations > 0

    def webhooks_of(self, kind: WebhookType) -> tuple[Webhook, ...]:
        return tuple(h for h in self.webhooks if h.type == kind)


def step_weights(analysis: dict[str, Any]) -> tuple[int, ...]:
    if analysis.get("stepWeights"):
        return tuple(int(w) for w in analysis["stepWeights"])
    step = analysis.get("stepWeight")
    if not step:
        return ()
    top = int(analysis["maxWeight"])
    weights = list(range(int(step), top + 1, int(step)))
    if weights[-1] != top:
        weights.append(top)
    return tuple(weights)


def compile_rollout(body: dict[str, Any]) -> Rollout:
    """`body` as `validate_document` normalized it (meshctl apply or kube-sync wrote it)."""
    meta, spec = body["metadata"], body["spec"]
    analysis = spec["analysis"]
    namespace = meta["namespace"]
    checks = tuple(
        MetricCheck(m["name"], m["thresholdRange"].get("min"), m["thresholdRange"].get("max"))
        for m in analysis.get("metrics") or ()
    )
    hooks = tuple(
        Webhook(
            h["name"],
            h.get("type", "rollout"),
            h["url"],
            seconds(h["timeout"]) if h.get("timeout") else DEFAULT_WEBHOOK_TIMEOUT,
            tuple(sorted((h.get("metadata") or {}).items())),
        )
        for h in analysis.get("webhooks") or ()
    )
    return Rollout(
        namespace=namespace,
        name=meta["name"],
        host=spec["host"],
        fqdn=fqdn(spec["host"], namespace),
        virtual_service=spec["virtualService"]["name"],
        route=spec["virtualService"].get("route"),
        destination_rule=spec["destinationRule"]["name"],
        stable=spec["stable"],
        canary=spec["canary"],
        promotion=spec.get("promotion", "canary"),
        interval=seconds(analysis["interval"]),
        threshold=int(analysis["threshold"]),
        steps=step_weights(analysis),
        iterations=int(analysis.get("iterations") or 0),
        match=tuple(analysis.get("match") or ()),
        min_requests=int(analysis.get("minRequests") or 0),
        metrics=checks,
        webhooks=hooks,
    )
