"""Observability: Istio-compatible metrics, access logs and tracing, and the 15020 HTTP endpoint.

The data plane records through small synchronous calls that never block (`IstioMetrics`,
`AccessLog`, `Tracer`); rendering, writing and exporting happen in their own tasks.
"""
