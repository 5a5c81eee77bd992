"""Documents and metric readings the rollout unit tests share."""

from __future__ import annotations

from typing import Any

from nodeagent.config.batch import Document, validate_batch
from nodeagent.config.documents import load_text
from nodeagent.rollout.sources import Reading
from nodeagent.telemetry.exposition import Sample
from nodeagent.telemetry.metrics import DURATION_BUCKETS_MS

HOST = "my-app.default.svc.cluster.local"

MESH = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: my-app}
spec:
  hosts: [my-app]
  http:
  - name: main
    match: [{uri: {prefix: /}}]
    route:
    - destination: {host: my-app, subset: v1, port: {number: 80}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: my-app}
spec:
  host: my-app
  subsets:
  - {name: v1, labels: {version: v1.0.0}}
  - {name: v2, labels: {version: v2.0.0}}
"""


def rollout_yaml(analysis: str, extra: str = "") -> str:
    return f"""
apiVersion: mesh.nodeagent.io/v1alpha1
kind: Rollout
metadata: {{name: my-app}}
spec:
  host: my-app
  virtualService: {{name: my-app}}
  destinationRule: {{name: my-app}}
  stable: v1
  canary: v2
{extra}  analysis:
{analysis}"""


CANARY = """    interval: 2s
    threshold: 2
    stepWeight: 20
    maxWeight: 60
    metrics:
    - {name: request-success-rate, thresholdRange: {min: 99}}
    - {name: request-duration, thresholdRange: {max: 200}}
"""

AB = """    interval: 2s
    threshold: 2
    iterations: 3
    match:
    - headers: {user-agent: {regex: ".*Firefox.*"}}
    metrics:
    - {name: request-success-rate, thresholdRange: {min: 99}}
"""


def documents(text: str) -> list[Document]:
    docs, errors = validate_batch(load_text(text, "t.yaml"), "default")
    assert errors == [], [str(e) for e in errors]
    return docs


def body(text: str) -> dict[str, Any]:
    (doc,) = documents(text)
    return doc.body


class Traffic:
    """Cumulative counters per version as one agent would export them."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], float] = {}
        self.buckets: dict[tuple[str, float], float] = {}

    def serve(self, version: str, n: int, *, code: str = "200", ms: float = 3.0) -> None:
        key = (version, code)
        self.requests[key] = self.requests.get(key, 0) + n
        for le in (*DURATION_BUCKETS_MS, float("inf")):
            if ms <= le:
                self.buckets[(version, le)] = self.buckets.get((version, le), 0) + n
            else:
                self.buckets.setdefault((version, le), 0)

    def reading(self, instance: str = "n1") -> Reading:
        base = {"reporter": "source", "destination_service": HOST}
        samples = [
            Sample(
                "istio_requests_total",
                {**base, "destination_version": v, "response_code": c},
                n,
            )
            for (v, c), n in sorted(self.requests.items())
        ]
        for (v, le), n in sorted(self.buckets.items()):
            text = "+Inf" if le == float("inf") else repr(float(le))
            samples.append(
                Sample(
                    "istio_request_duration_milliseconds_bucket",
                    {**base, "destination_version": v, "response_code": "200", "le": text},
                    n,
                )
            )
        return [(instance, samples)]
