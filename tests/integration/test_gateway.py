"""The ingress gateway on a sandbox node, driven from the outside host with curl and hey.

n1's agent runs the gateway (`up(gateway="n1")`); the outside host (10.200.0.100) has no route to
pods and talks only to http://10.200.0.11. Backends are small Python servers in pods on both
nodes, reached through the mTLS tunnel with the gateway's own identity. Checked: the seed canary
(90/10 within the binomial 99.9% interval over 2,000 requests, `/my-app/x` arrives as `/x`), the
seed A/B (Chrome → v1, Firefox → v2, neither → 404 until a default route), a 50% abort, retries
over a flaky backend, a route timeout, and Bookinfo's gateway sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from l7_helpers import (
    BOOKINFO,
    SEED,
    binomial_interval,
    hey_codes,
    hits,
    write_app,
)
from mesh_helpers import apply, apply_file, eventually, http, meshctl, sandbox_fixture
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("gw", gateway="n1")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    app = write_app(files)
    out = {
        "v1": sandbox.pod_add(
            "n1", "default", "my-app-v1", [*app, "v1.0.0"],
            service_account="my-app", labels={"app": "my-app", "version": "v1.0.0"},
        ),
        "v2": sandbox.pod_add(
            "n2", "default", "my-app-v2", [*app, "v2.0.0"],
            service_account="my-app", labels={"app": "my-app", "version": "v2.0.0"},
        ),
        "flaky": sandbox.pod_add(
            "n2", "default", "flaky", [*app, "flaky"],
            service_account="flaky", labels={"app": "flaky"},
        ),
        "productpage": sandbox.pod_add(
            "n2", "default", "productpage-v1", [*app, "productpage", "9080"],
            service_account="bookinfo-productpage", labels={"app": "productpage"},
        ),
    }  # fmt: skip
    apply(
        sandbox,
        files,
        "services",
        [
            service("my-app", cluster_ip="10.96.80.10"),
            service("flaky", cluster_ip="10.96.80.11"),
            service("productpage", cluster_ip="10.96.80.12", port=9080, target=9080),
        ],
    )
    return out


def curl(sb: Sandbox, url: str, *headers: str, timeout: float = 5) -> tuple[int, str, float]:
    """(HTTP status, body, seconds) of one request from the outside host."""
    return http(sb, "outside", url, *headers, timeout=timeout)


def hey(sb: Sandbox, url: str, n: int, c: int = 20) -> dict[int, int]:
    r = sb.exec("outside", ["hey", "-n", str(n), "-c", str(c), "-t", "10", url], timeout=120)
    assert r.returncode == 0, f"hey: {r.stdout} {r.stderr}"
    return hey_codes(str(r.stdout))


def answers(sb: Sandbox, url: str, expect: str, *headers: str) -> bool:
    code, body, _ = curl(sb, url, *headers)
    return code == 200 and expect in body


def vs(name: str, host: str, http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"hosts": [host], "gateways": ["http-gateway"], "http": http},
    }


def to(host: str) -> list[dict[str, Any]]:
    return [{"destination": {"host": host, "port": {"number": 80}}}]


def test_gateway_url_and_outside_host(sandbox: Sandbox) -> None:
    assert sandbox.gateway_url() == "http://10.200.0.11:80"
    assert sandbox.gateway_url(8080) == "http://10.200.0.11:8080"
    r = sandbox.exec("outside", ["ip", "-4", "route"], timeout=10)
    assert r.returncode == 0
    assert "10.201." not in str(r.stdout), "the outside host must have no route to pods"


def test_canary_splits_90_10_and_rewrites(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    apply_file(sandbox, SEED / "01-canary.yaml")
    url = sandbox.gateway_url()
    eventually(lambda: answers(sandbox, f"{url}/my-app/x", "path=/x "), "canary route")
    before = {v: len(hits(pods[v])) for v in ("v1", "v2")}
    codes = hey(sandbox, f"{url}/my-app/x", 2000)
    assert codes == {200: 2000}, codes
    got = {v: len(hits(pods[v])) - before[v] for v in ("v1", "v2")}
    assert got["v1"] + got["v2"] == 2000, got
    low, high = binomial_interval(2000, 0.1)
    assert low <= got["v2"] <= high, f"v2 got {got['v2']} of 2000, expected {low:.0f}..{high:.0f}"
    # The rewrite: the app saw /x, never /my-app/x.
    assert "/my-app/x" not in hits(pods["v1"]) + hits(pods["v2"])


def test_ab_by_user_agent_then_default_route(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    apply_file(sandbox, SEED / "01-canary.yaml")  # the Gateway and the DestinationRule
    apply_file(sandbox, SEED / "03-ab-user-agent.yaml")
    url = f"{sandbox.gateway_url()}/my-app"
    chrome = "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36"
    firefox = "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
    # Wait on what only the A/B route does (the canary's VirtualService would answer Chrome
    # with v1 too, 90% of the time): a request matching neither rule gets no route.
    eventually(lambda: curl(sandbox, url, "User-Agent: curl/8")[0] == 404, "the A/B route")
    for _ in range(5):
        assert answers(sandbox, url, "version=v1.0.0", chrome)
        assert answers(sandbox, url, "version=v2.0.0", firefox)
    code, _, _ = curl(sandbox, url, "User-Agent: curl/8")
    assert code == 404
    # The seed's VirtualService with a default route (no match) appended as the last rule.
    ab: dict[str, Any] = yaml.safe_load((SEED / "03-ab-user-agent.yaml").read_text())
    ab["metadata"]["namespace"] = "default"
    default = {"destination": {"host": "my-app", "subset": "v1", "port": {"number": 80}}}
    ab["spec"]["http"].append({"route": [default]})
    apply(sandbox, files, "ab-default", [ab])
    eventually(lambda: answers(sandbox, url, "version=v1.0.0", "User-Agent: curl/8"), "default")
    assert answers(sandbox, url, "version=v2.0.0", firefox)


def test_abort_half_the_requests(sandbox: Sandbox, pods: dict[str, Pod], files: Path) -> None:
    apply_file(sandbox, SEED / "01-canary.yaml")
    route = {
        "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}},
        "route": to("my-app"),
    }
    apply(sandbox, files, "abort", [vs("abort", "abort.test", [route])])
    url = sandbox.gateway_url()
    eventually(lambda: curl(sandbox, url, "Host: abort.test")[0] == 503, "abort active")
    codes = _hey_host(sandbox, "abort.test", 400)
    assert set(codes) <= {200, 503}, codes
    low, high = binomial_interval(400, 0.5)
    assert low <= codes.get(503, 0) <= high, codes


def _hey_host(sb: Sandbox, host: str, n: int) -> dict[int, int]:
    url = sb.gateway_url()
    r = sb.exec(
        "outside", ["hey", "-n", str(n), "-c", "10", "-t", "10", "-host", host, f"{url}/"],
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, f"hey: {r.stdout} {r.stderr}"
    return hey_codes(str(r.stdout))


def test_retries_hide_a_flaky_backend(sandbox: Sandbox, pods: dict[str, Pod], files: Path) -> None:
    apply_file(sandbox, SEED / "01-canary.yaml")
    url = f"{sandbox.gateway_url()}/flaky"
    no_retries = {"route": to("flaky"), "retries": {"attempts": 0}}
    apply(sandbox, files, "flaky0", [vs("flaky", "flaky.test", [no_retries])])
    eventually(lambda: curl(sandbox, url, "Host: flaky.test")[0] == 503, "flaky without retries")
    codes = [curl(sandbox, url, "Host: flaky.test")[0] for _ in range(10)]
    assert codes.count(503) >= 4, codes  # every other request fails without retries
    retries = {"route": to("flaky"), "retries": {"attempts": 3, "retryOn": "5xx"}}
    apply(sandbox, files, "flaky3", [vs("flaky", "flaky.test", [retries])])
    eventually(
        lambda: all(curl(sandbox, url, "Host: flaky.test")[0] == 200 for _ in range(4)), "retries"
    )
    codes = [curl(sandbox, url, "Host: flaky.test")[0] for _ in range(10)]
    assert codes == [200] * 10, codes


def test_timeout_cuts_a_slow_response(sandbox: Sandbox, pods: dict[str, Pod], files: Path) -> None:
    apply_file(sandbox, SEED / "01-canary.yaml")
    route = {"route": to("flaky"), "timeout": "1s", "retries": {"attempts": 0}}
    apply(sandbox, files, "slow", [vs("slow", "slow.test", [route])])
    url = f"{sandbox.gateway_url()}/slow"
    eventually(lambda: curl(sandbox, url, "Host: slow.test")[0] == 504, "timeout route")
    code, body, elapsed = curl(sandbox, url, "Host: slow.test")
    assert code == 504, body
    assert 0.9 <= elapsed < 2.5, elapsed


def test_bookinfo_gateway_sample(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    apply_file(sandbox, BOOKINFO / "bookinfo-gateway.yaml")
    url = sandbox.gateway_url(8080)
    eventually(lambda: answers(sandbox, f"{url}/productpage", "version=productpage"), "bookinfo")
    assert answers(sandbox, f"{url}/static/app.css", "path=/static/app.css")
    assert answers(sandbox, f"{url}/api/v1/products/1", "path=/api/v1/products/1")
    assert curl(sandbox, f"{url}/productpage/extra")[0] == 404  # exact match only
    assert curl(sandbox, f"{url}/admin")[0] == 404
    meshctl(sandbox, "get", "gateways")
