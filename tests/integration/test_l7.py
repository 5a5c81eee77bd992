"""L7 routing pod to pod on a 2-node sandbox: the client's agent routes HTTP, the tunnel carries it.

A client pod on n1 calls service VIPs; the backends (small Python servers that answer with their
version and the path they saw) run on n2 and n1. Checked with curl and hey from the client pod:
Bookinfo's header route (end-user: jason → v2, else v3), Bookinfo's 80/20 split (within the
binomial 99.9% interval), the seed fault (every request delayed 7 s, measured on one), and a
weighted TCP route on an L4 port that sends every connection to a subset.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from l7_helpers import (
    BOOKINFO,
    SEED,
    binomial_interval,
    hey_codes,
    hits,
    write_app,
)
from mesh_helpers import apply, apply_file, eventually, http, sandbox_fixture, wait_config
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("l7")
REVIEWS = "10.96.81.10"
MY_APP = "10.96.81.11"
RATINGS = "10.96.81.12"
ECHO = "10.96.81.13"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("l7")


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    app = write_app(files)
    out: dict[str, Pod] = {
        "client": sandbox.pod_add("n1", "default", "client", ["sleep", "3600"]),
        "ratings-v2": sandbox.pod_add(
            "n2", "default", "ratings-v2", [*app, "ratings-v2", "9080"],
            service_account="bookinfo-ratings", labels={"app": "ratings", "version": "v2"},
        ),
    }  # fmt: skip
    for v, node in (("v1", "n1"), ("v2", "n2"), ("v3", "n2")):
        out[f"reviews-{v}"] = sandbox.pod_add(
            node, "default", f"reviews-{v}", [*app, f"reviews-{v}", "9080"],
            service_account="bookinfo-reviews", labels={"app": "reviews", "version": v},
        )  # fmt: skip
    echo = service("echo", {"app": "reviews"}, cluster_ip=ECHO, port=9000, target=9080)
    echo["spec"]["ports"][0]["name"] = "tcp-echo"  # an L4 port: TCP routes, no HTTP parsing
    docs = [
        service("reviews", cluster_ip=REVIEWS, port=9080, target=9080),
        service("my-app", cluster_ip=MY_APP),
        service("ratings", cluster_ip=RATINGS, port=9080, target=9080),
        echo,
        dr("ratings", ["v2"]),
        dr("echo", ["v1", "v2", "v3"]),
    ]
    apply(sandbox, files, "services", docs)
    apply_file(sandbox, BOOKINFO / "destination-rule-reviews.yaml")
    return out


def dr(host: str, versions: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": "default"},
        "spec": {
            "host": host,
            "subsets": [{"name": v, "labels": {"version": v}} for v in versions],
        },
    }


def curl(sb: Sandbox, pod: Pod, url: str, *headers: str, timeout: float = 5) -> tuple[int, str]:
    code, body, _ = http(sb, pod, url, *headers, timeout=timeout)
    return code, body


def answers(sb: Sandbox, pod: Pod, url: str, expect: str, *headers: str) -> bool:
    code, body = curl(sb, pod, url, *headers)
    return code == 200 and expect in body


def test_header_route_bookinfo_jason(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    apply_file(sandbox, BOOKINFO / "virtual-service-reviews-jason-v2-v3.yaml")
    client, url = pods["client"], f"http://{REVIEWS}:9080/reviews/0"
    # Wait until n1's agent (the client's) holds the VirtualService: before it, the Service
    # balances over every version, so an answer from v3 (or v2) alone proves nothing.
    wait_config(sandbox, "n1")
    for _ in range(5):
        assert answers(sandbox, client, url, "version=reviews-v2", "end-user: jason")
        assert answers(sandbox, client, url, "version=reviews-v3", "end-user: alice")
        assert answers(sandbox, client, url, "version=reviews-v3")


def test_weighted_split_bookinfo_80_20(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    apply_file(sandbox, BOOKINFO / "virtual-service-reviews-80-20.yaml")
    client, url = pods["client"], f"http://{REVIEWS}:9080/split"
    eventually(
        lambda: not any(answers(sandbox, client, url, "reviews-v3") for _ in range(5)), "80/20"
    )
    before = {v: hits(pods[f"reviews-{v}"]).count("/split") for v in ("v1", "v2", "v3")}
    r = sandbox.exec(client, ["hey", "-n", "1000", "-c", "10", "-t", "10", url], timeout=120)
    assert hey_codes(str(r.stdout)) == {200: 1000}, r.stdout
    got = {v: hits(pods[f"reviews-{v}"]).count("/split") - before[v] for v in ("v1", "v2", "v3")}
    assert got["v3"] == 0, got
    assert got["v1"] + got["v2"] == 1000, got
    low, high = binomial_interval(1000, 0.2)
    assert low <= got["v2"] <= high, f"v2 {got['v2']} of 1000, expected {low:.0f}..{high:.0f}"


def test_seed_fault_delays_7s(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    client = pods["client"]
    # ratings-v2 serves first (a new pod is an endpoint once its certificate is issued).
    eventually(
        lambda: answers(sandbox, client, f"http://{RATINGS}:9080/", "ratings-v2"), "ratings-v2"
    )
    apply_file(sandbox, SEED / "02-fault-delay.yaml")
    wait_config(sandbox, "n1")  # n1's snapshot has the fault VirtualService
    started = time.monotonic()
    code, body = curl(sandbox, client, f"http://{MY_APP}/rate", timeout=15)
    elapsed = time.monotonic() - started
    assert code == 200, body
    assert "version=ratings-v2 path=/rate" in body, body
    assert 7.0 <= elapsed < 8.5, elapsed


def test_tcp_route_weights_to_a_subset(sandbox: Sandbox, pods: dict[str, Pod], files: Path) -> None:
    client, url = pods["client"], f"http://{ECHO}:9000/tcp"
    eventually(lambda: answers(sandbox, client, url, "version=reviews-"), "echo port")
    route = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {
            "hosts": ["echo"],
            "tcp": [
                {
                    "route": [
                        {"destination": {"host": "echo", "subset": "v2"}, "weight": 100},
                        {"destination": {"host": "echo", "subset": "v3"}, "weight": 0},
                    ]
                }
            ],
        },
    }
    apply(sandbox, files, "tcp-route", [route])
    eventually(
        lambda: all(answers(sandbox, client, url, "version=reviews-v2") for _ in range(6)),
        "every connection to subset v2",
    )
