"""Rollouts driven by the sandbox's controller under real traffic (issue 18).

One 2-node sandbox; `my-app` has four releases: v1 and v2 healthy, v3 answers every 10th
request 500, v4 answers 300 ms late. A client pod on n1 sends constant load to my-app's VIP
(nodeagent/demo/steady.py: ~100 requests/s, each recorded with its time, status and the
version that answered). Every test starts from "100% v1", applies one Rollout and follows its
status record in the store until the rollout ends; the controller reads both agents' 15020
endpoints, as in production.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from l7_helpers import binomial_interval
from mesh_helpers import eventually, http, sandbox_fixture
from snapshot_docs import service

from nodeagent.demo.steps import BACKEND, STEADY
from nodeagent.meshctl.main import main as meshctl_main
from nodeagent.rollout.status import Status, read_status
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.store import keys, open_store
from nodeagent.store.codec import decode

pytestmark = [pytest.mark.root, pytest.mark.slow]
VIP = "10.96.83.10"
RATE = 100
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"
SETTLE = 0.5  # seconds a route change may take to reach both agents
PROPAGATION_BOUND = 3.0  # the same, as a bound under a full suite's load

sandbox = sandbox_fixture("ro")


def meshctl(sb: Sandbox, *args: str) -> str:
    """meshctl in this process (no interpreter start-up per call): its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = meshctl_main(["--store", sb.store_url, *args])
    assert code == 0, f"meshctl {args}: {out.getvalue()} {err.getvalue()}"
    return out.getvalue()


def apply(sb: Sandbox, d: Path, name: str, docs: list[dict[str, Any]]) -> None:
    path = d / f"{name}.json"
    path.write_text("\n---\n".join(json.dumps(x) for x in docs))
    meshctl(sb, "apply", "-f", str(path))


@pytest.fixture(scope="module")
def mesh(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("rollouts")
    app = [sys.executable, "-I", str(BACKEND)]
    releases = {"v1": ("n1", []), "v2": ("n2", []), "v3": ("n2", ["--fail-every", "10"]),
                "v4": ("n1", ["--delay-ms", "300"])}  # fmt: skip
    for version, (node, extra) in releases.items():
        sandbox.pod_add(
            node, "default", f"my-app-{version}", [*app, version, *extra],
            service_account="my-app", labels={"app": "my-app", "version": version},
        )  # fmt: skip
    client = sandbox.pod_add("n1", "default", "client", ["sleep", "3600"])
    rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "my-app", "namespace": "default"},
        "spec": {
            "host": "my-app",
            "subsets": [{"name": v, "labels": {"version": v}} for v in releases],
        },
    }
    apply(sandbox, d, "mesh", [service("my-app", cluster_ip=VIP), rule, _stable_vs()])
    eventually(lambda: http(sandbox, client, f"http://{VIP}/")[0] == 200, "client → my-app")
    return {"dir": d, "client": client}


def _stable_vs() -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "my-app", "namespace": "default"},
        "spec": {
            "hosts": ["my-app"],
            "http": [
                {"name": "main", "route": [{"destination": {"host": "my-app", "subset": "v1"}}]}
            ],
        },
    }


def _rollout(name: str, canary: str, analysis: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "host": "my-app",
            "virtualService": {"name": "my-app", "route": "main"},
            "destinationRule": {"name": "my-app"},
            "stable": "v1",
            "canary": canary,
            "analysis": analysis,
        },
    }


def _canary_analysis(interval: str, p99_ms: int = 500) -> dict[str, Any]:
    return {
        "interval": interval,
        "threshold": 2,
        "stepWeight": 20,
        "maxWeight": 60,
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}},
            {"name": "request-duration", "thresholdRange": {"max": p99_ms}},
        ],
    }


def status(sb: Sandbox, name: str) -> Status | None:
    async def read() -> Status | None:
        store = await open_store(sb.store_url)
        try:
            return await read_status(store, "default", name)
        finally:
            await store.aclose()

    return trio.run(read)


def route(sb: Sandbox) -> list[tuple[str, int | None]]:
    async def read() -> Any:
        store = await open_store(sb.store_url)
        try:
            kv = await store.get(keys.config("VirtualService", "default", "my-app"))
            assert kv is not None
            return decode(kv)
        finally:
            await store.aclose()

    vs = trio.run(read)
    (main,) = [h for h in vs["spec"]["http"] if h.get("name") == "main"]
    return [(d["destination"]["subset"], d.get("weight")) for d in main["route"]]


def wait_phase(sb: Sandbox, name: str, phases: set[str], timeout: float) -> Status:
    found: list[Status] = []

    def reached() -> bool:
        s = status(sb, name)
        if s is not None and s.phase in phases:
            found.append(s)
            return True
        return False

    eventually(reached, f"rollout {name} in {phases}", timeout=timeout)
    return found[0]


class Load:
    """steady.py in the client pod; `stop()` returns its requests [sent, status, version, ua,
    answered]."""

    def __init__(self, sb: Sandbox, pod: Pod, *agents: str, rate: int = RATE) -> None:
        argv = [sys.executable, "-I", str(STEADY), VIP, "80", "/", str(rate), "120", *agents]
        self.proc = sb.popen(pod, argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("started "), line
        self.started = float(line.split()[1])

    def stop(self) -> list[list[Any]]:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        (result,) = [x for x in out.splitlines() if x.startswith("result ")]
        requests: list[list[Any]] = json.loads(result.removeprefix("result "))["requests"]
        return requests


@pytest.fixture
def fresh(sandbox: Sandbox, mesh: dict[str, Any]) -> Iterator[Path]:
    """Every test starts with all traffic on v1 and leaves no Rollout behind."""
    d: Path = mesh["dir"]
    apply(sandbox, d, "stable", [_stable_vs()])
    yield d
    meshctl(sandbox, "delete", "rollout", *ROLLOUTS, "--ignore-not-found")


ROLLOUTS = ("healthy", "bad", "slow", "ab", "resume")


def _split_per_step(s: Status, requests: list[list[Any]], canary: str) -> list[str]:
    """Problems with the observed split: each step's share of `canary` within the 99.9%
    binomial interval of its weight (requests from SETTLE after the step to the next)."""
    problems = []
    steps = list(s.history)
    for this, after in itertools.pairwise(steps):
        w = int(this["weight"])
        inside = [r for r in requests if this["time"] + SETTLE <= r[0] < after["time"]]
        n, got = len(inside), sum(1 for r in inside if r[2] == canary)
        low, high = binomial_interval(n, w / 100)
        if n < 50 or not low <= got <= high:
            problems.append(
                f"weight {w}%: {got} of {n} to {canary} (expected {low:.0f}..{high:.0f})"
            )
    return problems


def test_a_healthy_canary_is_promoted_step_by_step(
    sandbox: Sandbox, mesh: dict[str, Any], fresh: Path
) -> None:
    load = Load(sandbox, mesh["client"])
    apply(sandbox, fresh, "healthy", [_rollout("healthy", "v2", _canary_analysis("2s"))])
    started = time.monotonic()
    try:
        done = wait_phase(sandbox, "healthy", {"Succeeded", "Failed"}, timeout=30)
    finally:
        requests = load.stop()
    took = time.monotonic() - started
    assert done.phase == "Succeeded", done.events
    assert [h["weight"] for h in done.history] == [20, 40, 60, 60]
    assert route(sandbox) == [("v2", None)]
    assert _split_per_step(done, requests, "v2") == []
    failed = [r for r in requests if r[1] != 200]
    assert failed == [], f"{len(failed)} of {len(requests)} requests failed"
    print(f"healthy canary: {len(done.history)} steps, promoted {took:.1f}s after apply")


def test_a_canary_with_errors_is_rolled_back(
    sandbox: Sandbox, mesh: dict[str, Any], fresh: Path
) -> None:
    load = Load(sandbox, mesh["client"])
    apply(sandbox, fresh, "bad", [_rollout("bad", "v3", _canary_analysis("1s"))])
    try:
        done = wait_phase(sandbox, "bad", {"Succeeded", "Failed"}, timeout=20)
        eventually(lambda: route(sandbox) == [("v1", None)], "all traffic on v1")
        time.sleep(1.0)  # a second of traffic after the rollback, to check where it goes
    finally:
        requests = load.stop()
    assert done.phase == "Failed"
    assert "success rate" in done.reason, done.reason
    began, ended = done.history[0]["time"], done.history[-1]["time"]
    # threshold * interval + interval, plus the drift of ticks (0.1 s) and scrapes per interval
    assert ended - began <= 2 * 1.0 + 1.0 + 1.0
    late = [r for r in requests if r[0] > ended + SETTLE]
    assert late, "no traffic after the rollback"
    assert {r[2] for r in late} == {"v1"}
    print(f"bad canary: rolled back {ended - began:.1f}s after the first step")


def test_a_slow_canary_is_rolled_back_on_p99(
    sandbox: Sandbox, mesh: dict[str, Any], fresh: Path
) -> None:
    load = Load(sandbox, mesh["client"])
    apply(sandbox, fresh, "slow", [_rollout("slow", "v4", _canary_analysis("1s", p99_ms=200))])
    try:
        done = wait_phase(sandbox, "slow", {"Succeeded", "Failed"}, timeout=20)
    finally:
        load.stop()
    assert done.phase == "Failed"
    assert "p99" in done.reason, done.reason
    assert done.last_analysis["request-duration"] is not None
    assert done.last_analysis["request-duration"] > 200
    eventually(lambda: route(sandbox) == [("v1", None)], "all traffic on v1")


def test_ab_iterations_then_promotion_and_the_report_matches_the_load(
    sandbox: Sandbox, mesh: dict[str, Any], fresh: Path
) -> None:
    analysis = {
        "interval": "1s",
        "threshold": 2,
        "iterations": 3,
        "match": [{"headers": {"user-agent": {"regex": ".*Firefox.*"}}}],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}],
    }
    load = Load(sandbox, mesh["client"], FIREFOX, CHROME, rate=60)
    apply(sandbox, fresh, "ab", [_rollout("ab", "v2", analysis)])
    try:
        done = wait_phase(sandbox, "ab", {"Succeeded", "Failed"}, timeout=20)
    finally:
        requests = load.stop()
    assert done.phase == "Succeeded", done.events
    assert done.iteration == 3
    report = json.loads(meshctl(sandbox, "ab", "report", "my-app", "--since", "10m", "-o", "json"))
    # The report covers the analysed windows, from the experiment's start to its last check:
    # the load generator's answers read inside that span (a request at a boundary may fall on
    # either side of the controller's reading of the counters: 2 requests of slack per side).
    began, ended = done.history[0]["time"], done.history[-1]["time"]
    inside = [r for r in requests if began <= r[4] <= ended]
    # Firefox moves to v2 once the match route reaches n1's agent (SETTLE on a quiet machine,
    # more under load), and stays there; Chrome stays on v1 throughout. Ordered by send time:
    # the agent routes a request when it arrives, and a slow answer may come after a later one.
    firefox = sorted((r for r in inside if r[3] == 0), key=lambda r: r[0])
    timeline = [(round(r[0] - began, 3), round(r[4] - began, 3), r[2]) for r in firefox]
    switched = next((r[0] for r in firefox if r[2] == "v2"), None)
    assert switched is not None, timeline
    assert switched - began <= PROPAGATION_BOUND, timeline
    assert {r[2] for r in firefox if r[0] >= switched} == {"v2"}, timeline
    assert {r[2] for r in inside if r[3] == 1} == {"v1"}  # Chrome
    counted = {v: sum(1 for r in inside if r[2] == v) for v in ("v1", "v2")}
    by_subset = {v["subset"]: v for v in report["variants"]}
    for subset in ("v1", "v2"):
        assert abs(by_subset[subset]["requests"] - counted[subset]) <= 4, (report, counted)
        assert by_subset[subset]["requests"] > 50
    assert by_subset["v2"]["branch"] == "match"
    assert by_subset["v1"]["branch"] == "default"
    assert by_subset["v2"]["successRate"] == 100.0
    assert by_subset["v2"]["p99"] is not None
    assert report["comparison"]["significant"] is False  # neither variant failed
    table = meshctl(sandbox, "ab", "report", "my-app")
    assert "two-proportion z-test" in table
    assert f"v2      match    {by_subset['v2']['requests']}" in table


def test_a_killed_controller_resumes_at_the_recorded_step(
    sandbox: Sandbox, mesh: dict[str, Any], fresh: Path
) -> None:
    load = Load(sandbox, mesh["client"])
    apply(sandbox, fresh, "resume", [_rollout("resume", "v2", _canary_analysis("1s"))])
    try:
        eventually(
            lambda: (s := status(sandbox, "resume")) is not None and s.weight == 40,
            "the rollout at 40%",
            timeout=15,
        )
        sandbox.stop_controller(kill=True)
        at_kill = status(sandbox, "resume")
        assert at_kill is not None
        sandbox.start_controller()
        done = wait_phase(sandbox, "resume", {"Succeeded", "Failed"}, timeout=30)
    finally:
        requests = load.stop()
    assert done.phase == "Succeeded", done.events
    weights = [h["weight"] for h in done.history]
    assert weights == [20, 40, 60, 60]  # continued at 40%, not from the start
    assert done.history[: len(at_kill.history)] == at_kill.history
    assert sum(1 for e in done.events if str(e["message"]).startswith("new rollout")) == 1
    assert [r for r in requests if r[1] != 200] == []
