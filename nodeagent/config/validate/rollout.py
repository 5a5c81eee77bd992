"""Rollout (mesh.nodeagent.io): an automated canary or A/B experiment on one host.

The `analysis` block follows Flagger's Canary (interval, stepWeight/stepWeights, maxWeight,
threshold, iterations + match, metrics with thresholdRange, webhooks), so its users know the
fields. Only the two built-in metrics exist: `request-success-rate` (percent, a minimum) and
`request-duration` (p99 in milliseconds, a maximum), both read from the mesh's own Istio metrics.
The controller (`nodeagent.rollout`) compiles a validated spec into frozen dataclasses.
"""

from __future__ import annotations

from typing import Any

from nodeagent.config.schema import (
    Unsupported,
    Walker,
    duration,
    enum,
    integer,
    list_of,
    map_of,
    number,
    obj,
    string,
    unique,
    with_checks,
)
from nodeagent.config.validate.common import dns1123_label, dns1123_subdomain, header_name, hostname
from nodeagent.config.validate.virtualservice import string_match

METRICS = ("request-success-rate", "request-duration")
WEBHOOK_TYPES = ("pre-rollout", "rollout", "post-rollout")


def _url(value: str) -> str | None:
    if not value.startswith(("http://", "https://")):
        return f"Invalid value: {value!r}: must be an http:// or https:// URL"
    return None


def _metric_check(w: Walker, path: str, value: Any) -> None:
    bounds = value.get("thresholdRange") or {}
    if value["name"] == "request-success-rate" and bounds.get("min") is None:
        w.error(f"{path}.thresholdRange.min", "Required value (request-success-rate is a minimum)")
    if value["name"] == "request-duration" and bounds.get("max") is None:
        w.error(f"{path}.thresholdRange.max", "Required value (request-duration is a maximum)")


_metric = obj(
    {
        "name": enum(METRICS),
        "thresholdRange": obj({"min": number(minimum=0), "max": number(minimum=0)}, min_fields=1),
        "interval": Unsupported("metrics are measured over the analysis interval"),
        "templateRef": Unsupported("only the built-in metrics"),
        "query": Unsupported("only the built-in metrics"),
    },
    required=["name", "thresholdRange"],
    checks=[_metric_check],
)

_webhook = obj(
    {
        "name": string(min_len=1, check=dns1123_subdomain),
        "type": enum(WEBHOOK_TYPES, unsupported=["confirm-rollout", "confirm-promotion", "event"]),
        "url": string(min_len=1, check=_url),
        "timeout": duration(),
        "metadata": map_of(string(), max_items=64),
    },
    required=["name", "url"],
)

_match = obj(
    {
        "headers": map_of(string_match(allow_empty=True), key=header_name, max_items=64),
        "queryParams": map_of(string_match(allow_empty=True), max_items=64),
        "uri": string_match(),
    },
    min_fields=1,
)


def _weights_increase(w: Walker, path: str, value: Any) -> None:
    for i in range(1, len(value)):
        if value[i] <= value[i - 1]:
            w.error(f"{path}[{i}]", f"Invalid value: {value[i]}: step weights must increase")


def _analysis_check(w: Walker, path: str, value: Any) -> None:
    ab = value.get("iterations") is not None
    steps = value.get("stepWeight") is not None or value.get("stepWeights") is not None
    if ab and steps:
        w.error(path, "iterations (an A/B experiment) cannot be combined with step weights")
    elif not ab and not steps:
        w.error(path, "set stepWeight (or stepWeights) for a canary, or iterations for A/B")
    if ab and value.get("match") is None:
        w.required(f"{path}.match")
    if not ab and value.get("match") is not None:
        w.error(f"{path}.match", "is only meaningful with iterations (an A/B experiment)")
    if value.get("stepWeight") is not None and value.get("maxWeight") is None:
        w.required(f"{path}.maxWeight")
    if value.get("stepWeights") is not None and value.get("maxWeight") is not None:
        w.error(f"{path}.maxWeight", "the last of stepWeights is the maximum; drop maxWeight")
    if (value.get("stepWeight") or 0) > (value.get("maxWeight") or 100):
        w.error(f"{path}.stepWeight", "must not be over maxWeight")


_analysis = obj(
    {
        "interval": duration(minimum_ms=100),
        "threshold": integer(minimum=1, maximum=1000),
        "stepWeight": integer(minimum=1, maximum=100),
        "stepWeights": with_checks(
            list_of(integer(minimum=1, maximum=100), min_items=1, max_items=100),
            _weights_increase,
        ),
        "maxWeight": integer(minimum=1, maximum=100),
        "iterations": integer(minimum=1, maximum=10_000),
        "match": list_of(_match, min_items=1, max_items=16),
        "minRequests": integer(minimum=1, maximum=1_000_000_000),
        "metrics": with_checks(list_of(_metric, max_items=8), unique("name")),
        "webhooks": with_checks(list_of(_webhook, max_items=16), unique("name")),
        "stepWeightPromotion": Unsupported(),
        "mirror": Unsupported(),
        "sessionAffinity": Unsupported(),
        "alerts": Unsupported(),
    },
    required=["interval", "threshold"],
    checks=[_analysis_check],
)


def _spec_check(w: Walker, path: str, value: Any) -> None:
    if value["stable"] == value["canary"]:
        w.error(f"{path}.canary", f'must differ from stable (both "{value["stable"]}")')


spec = obj(
    {
        "host": string(min_len=1, check=lambda v: hostname(v, wildcard=False)),
        "virtualService": obj(
            {"name": string(min_len=1, check=dns1123_subdomain), "route": string(min_len=1)},
            required=["name"],
        ),
        "destinationRule": obj(
            {"name": string(min_len=1, check=dns1123_subdomain)}, required=["name"]
        ),
        "stable": string(min_len=1, check=dns1123_label),
        "canary": string(min_len=1, check=dns1123_label),
        "promotion": enum(["canary", "stableLabels"]),
        "analysis": _analysis,
        "targetRef": Unsupported("name the host and subsets; the mesh does not scale Deployments"),
        "service": Unsupported("name the host and subsets instead"),
    },
    required=["host", "virtualService", "destinationRule", "stable", "canary", "analysis"],
    checks=[_spec_check],
)
