"""The per-rule statics cache of `decide` is invisible: cached and uncached decisions are equal.

Property test over Bookinfo's and the seed corpus's VirtualServices: any sequence of requests
(hosts, paths, headers, ports, source namespaces and gateways) over snapshots that change
between requests gets, with the same random draws, exactly the decisions of the uncached path.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_helpers import bookinfo_base, build, corpus, service, workload

from nodeagent.routing import Request, Source, decide
from nodeagent.routing.model import Decision
from nodeagent.snapshot import Snapshot

_VS_FILES = (
    "virtual-service-all-v1.yaml",
    "virtual-service-details-v2.yaml",
    "virtual-service-ratings-test-abort.yaml",
    "virtual-service-ratings-test-delay.yaml",
    "virtual-service-reviews-80-20.yaml",
    "virtual-service-reviews-jason-v2-v3.yaml",
    "virtual-service-reviews-test-v2.yaml",
    "virtual-service-reviews-v2-v3.yaml",
)


def _snapshots() -> list[Snapshot]:
    out = [build(*bookinfo_base())]
    for name in _VS_FILES:
        out.append(build(*bookinfo_base(), *corpus(f"istio/bookinfo-networking/{name}")))
    for name in ("01-canary.yaml", "02-fault-delay.yaml", "03-ab-user-agent.yaml"):
        docs = corpus(f"seed/{name}")
        app = [
            service("my-app", port=80, target=8080),
            workload("10.2.0.1", {"app": "my-app", "version": "v1"}),
            workload("10.2.0.2", {"app": "my-app", "version": "v2"}),
        ]
        out.append(build(*app, *docs))
    # Two ports and a destination without one: the request's port picks the service port.
    multi = service("multi", port=80, target=8080)
    multi["spec"]["ports"].append({"name": "http-alt", "port": 9080, "targetPort": 9080})
    # Two DestinationRules for it, the client's namespace picks one: the source namespace counts.
    route = {"route": [{"destination": {"host": "multi", "subset": "a"}}], "timeout": "3s"}
    drs = [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "multi", "namespace": ns},
            "spec": {
                "host": "multi.default.svc.cluster.local",
                "subsets": [{"name": "a", "labels": {"version": version}}],
            },
        }
        for ns, version in (("default", "v1"), ("other", "v2"))
    ]
    docs = (multi, workload("10.3.0.1", {"app": "multi"}), *drs, _vs("multi", [route]))
    out.append(build(*docs))
    return out


def _vs(host: str, http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": host, "namespace": "default"},
        "spec": {"hosts": [host], "http": http},
    }


# The module (the package's `decide` attribute is the function of the same name).
decide_module = importlib.import_module("nodeagent.routing.decide")
SNAPSHOTS = _snapshots()
HOSTS = ("multi", "reviews", "ratings", "details", "productpage", "my-app", "unknown")

requests = st.builds(
    lambda host, path, user, agent, port, method, qualified: Request(
        method=method,
        authority=f"{host}:{port}",
        path=path,
        headers={"end-user": user, "user-agent": agent},
        port=port,
        host=f"{host}.default.svc.cluster.local" if qualified else None,
    ),
    st.sampled_from(HOSTS),
    st.sampled_from(("/", "/reviews/1", "/ratings", "/api/v1", "/my-app/x")),
    st.sampled_from(("jason", "alice", "")),
    st.sampled_from(("curl/8", "Mozilla/5.0 Firefox", "wrk")),
    st.sampled_from((80, 9080)),
    st.sampled_from(("GET", "POST")),
    st.booleans(),
)
sources = st.builds(
    Source,
    namespace=st.sampled_from(("default", "other")),
    labels=st.sampled_from(({}, {"app": "productpage", "version": "v1"})),
    gateway=st.sampled_from(("mesh", "default/bookinfo-gateway")),
)
# Requests mostly against one or two snapshots (so that rules are met again), then a switch.
steps = st.lists(st.integers(0, len(SNAPSHOTS) - 1), min_size=1, max_size=2).flatmap(
    lambda snaps: st.lists(
        st.tuples(st.sampled_from(snaps), sources, requests), min_size=1, max_size=16
    )
)


@contextmanager
def _uncached() -> Iterator[None]:
    decide_module._STATICS.enabled = False
    try:
        yield
    finally:
        decide_module._STATICS.enabled = True


def _run(sequence: list[tuple[int, Source, Request]], seed: int) -> list[Decision]:
    rand = random.Random(seed).random
    return [decide(SNAPSHOTS[i], source, request, rand=rand) for i, source, request in sequence]


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 2**32))
def test_cached_decisions_equal_uncached_ones(
    sequence: list[tuple[int, Source, Request]], seed: int
) -> None:
    cached = _run(sequence, seed) + _run(sequence, seed)  # the second pass hits the cache
    with _uncached():
        uncached = _run(sequence, seed) + _run(sequence, seed)
    assert cached == uncached


def test_every_key_part_counts_for_a_multi_port_service_with_per_namespace_subsets() -> None:
    sequence = [
        (len(SNAPSHOTS) - 1, Source(namespace=ns, gateway=gw), request)
        for ns in ("default", "other")
        for gw in ("mesh", "default/bookinfo-gateway")
        for port in (80, 9080)
        for request in (
            Request(method="GET", authority=f"multi:{port}", path="/", port=port),
            Request(
                method="GET", authority="multi", path="/", port=port,
                host="multi.default.svc.cluster.local",
            ),
        )
    ]  # fmt: skip
    cached = _run(sequence, 1) + _run(sequence, 1)
    with _uncached():
        uncached = _run(sequence, 1) + _run(sequence, 1)
    assert cached == uncached
    labels = {
        d.chosen.subset_labels["version"] for d in cached if d.chosen and d.chosen.subset_labels
    }
    ports = {d.chosen.port for d in cached if d.chosen}
    assert labels == {"v1", "v2"}  # the test does exercise both
    assert ports == {80, 9080}


def test_the_cache_is_hit_and_reset_by_a_new_snapshot() -> None:
    snap, other = SNAPSHOTS[5], SNAPSHOTS[6]  # reviews 80/20; jason → v2, others → v3
    request = Request(method="GET", authority="reviews:9080", path="/", port=9080)
    source = Source(namespace="default")
    first = decide(snap, source, request, rand=lambda: 0.1)
    again = decide(snap, source, request, rand=lambda: 0.1)
    assert again.destinations is first.destinations  # served from the cache
    assert first.chosen is not None
    assert first.chosen.subset == "v1"
    switched = decide(other, source, request, rand=lambda: 0.1)
    assert switched.destinations is not first.destinations
    assert switched.chosen is not None
    assert switched.chosen.subset == "v3"
    assert decide(snap, source, request, rand=lambda: 0.9).chosen == first.destinations[1]


@pytest.mark.parametrize("max_entries", [1, 2])
def test_the_cache_stays_bounded(max_entries: int, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = decide_module.StaticsCache()
    monkeypatch.setattr(cache, "MAX_ENTRIES", max_entries)
    snap = SNAPSHOTS[5]
    (vs,) = snap.routes_for("reviews.default.svc.cluster.local")
    for port in range(10):
        cache.get(snap, vs.http[0], vs.namespace, Source(), port)
        assert len(cache._entries) <= max_entries
