"""Automated releases: the `Rollout` kind's controller (canary by weights, or A/B by match).

`model` compiles a validated Rollout document into frozen dataclasses; `metrics` turns scrapes of
Istio's metrics into per-subset figures over a window (pure); `analysis` decides the next move of
a rollout from its spec, status and figures (pure, a fake clock in tests); `routes` rewrites the
VirtualService (and DestinationRule) for a weight (pure); `status` reads and writes the status
record; `sources` scrapes every agent's 15020 endpoint or a Prometheus; `leader` elects one
controller through a store lease; `controller` is the loop; `significance` holds the A/B test.
"""
