"""The Rollout kind is validated like every kind: unknown fields by path, Flagger's rules."""

from __future__ import annotations

from rollout_docs import AB, CANARY, body, rollout_yaml

from nodeagent.config.batch import validate_batch
from nodeagent.config.documents import load_text
from nodeagent.rollout.model import compile_rollout, step_weights


def errors_of(text: str) -> list[str]:
    _, errors = validate_batch(load_text(text, "t.yaml"), "default")
    return [f"{e.error.path}: {e.error.message}" for e in errors]


def test_a_canary_and_an_ab_rollout_validate_and_compile() -> None:
    canary = compile_rollout(body(rollout_yaml(CANARY)))
    assert canary.steps == (20, 40, 60)
    assert canary.interval == 2.0
    assert canary.fqdn == "my-app.default.svc.cluster.local"
    ab = compile_rollout(body(rollout_yaml(AB)))
    assert ab.is_ab
    assert ab.iterations == 3
    assert ab.steps == ()


def test_unknown_and_unsupported_fields_are_rejected_by_path() -> None:
    text = rollout_yaml(CANARY + "    bogus: 1\n", "  targetRef: {name: x}\n")
    assert errors_of(text) == [
        "spec.targetRef: is not supported (name the host and subsets; the mesh does not scale "
        "Deployments)",
        "spec.analysis.bogus: unknown field",
    ]


def test_flaggers_rules() -> None:
    both = CANARY + "    iterations: 3\n"
    assert "iterations (an A/B experiment) cannot be combined with step weights" in str(
        errors_of(rollout_yaml(both))
    )
    no_max = CANARY.replace("    maxWeight: 60\n", "")
    assert errors_of(rollout_yaml(no_max)) == ["spec.analysis.maxWeight: Required value"]
    no_match = AB.split("    match:")[0]
    assert errors_of(rollout_yaml(no_match)) == ["spec.analysis.match: Required value"]
    no_min = CANARY.replace("{min: 99}", "{max: 99}")
    assert errors_of(rollout_yaml(no_min)) == [
        "spec.analysis.metrics[0].thresholdRange.min: Required value (request-success-rate is "
        "a minimum)"
    ]
    same = rollout_yaml(CANARY).replace("canary: v2", "canary: v1")
    assert errors_of(same) == ['spec.canary: must differ from stable (both "v1")']


def test_step_weights_end_at_max_weight() -> None:
    assert step_weights({"stepWeight": 25, "maxWeight": 60}) == (25, 50, 60)
    assert step_weights({"stepWeights": [5, 10, 50]}) == (5, 10, 50)
