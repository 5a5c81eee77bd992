"""`meshctl rollout …` and `meshctl ab report` through `main([...])` against a real sqlite store,
with the rollout moved by the controller's own functions (the sandbox tests run the real
controller process: tests/integration/test_rollouts.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from nodeagent.meshctl.main import main
from nodeagent.rollout import analysis
from nodeagent.rollout.commit import commit, load
from nodeagent.rollout.metrics import Figures
from nodeagent.rollout.windows import Window
from nodeagent.store import keys, open_store
from nodeagent.store.codec import decode

DOCS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: my-app}
spec:
  hosts: [my-app]
  http:
  - route:
    - destination: {host: my-app, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: my-app}
spec:
  host: my-app
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: mesh.nodeagent.io/v1alpha1
kind: Rollout
metadata: {name: my-app}
spec:
  host: my-app
  virtualService: {name: my-app}
  destinationRule: {name: my-app}
  stable: v1
  canary: v2
  analysis:
    interval: 10s
    threshold: 2
    iterations: 3
    match: [{headers: {user-agent: {regex: ".*Firefox.*"}}}]
"""


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path}/mesh.db"
    monkeypatch.setenv("MESH_STORE", url)
    (tmp_path / "docs.yaml").write_text(DOCS)
    assert main(["apply", "-f", str(tmp_path / "docs.yaml")]) == 0
    return url


def started(url: str, windows: Sequence[Window] = ()) -> None:
    """What the controller's first two ticks write, then the given analysed windows."""

    async def run() -> None:
        store = await open_store(url)
        try:
            loaded = await load(store, "default", "my-app")
            now = time.time() - 60
            assert await commit(
                store, loaded, analysis.Move(analysis.start(loaded.rollout, loaded.revision, now))
            )
            loaded = await load(store, "default", "my-app")
            assert loaded.status is not None
            assert await commit(store, loaded, analysis.begin(loaded.rollout, loaded.status, now))
            for w in windows:
                loaded = await load(store, "default", "my-app")
                assert loaded.status is not None
                check = analysis.evaluate(loaded.rollout, w.subsets["v2"])
                move = analysis.step(loaded.rollout, loaded.status, check, w.end)
                assert await commit(store, loaded, move, w)
        finally:
            await store.aclose()

    trio.run(run)


def routes(url: str) -> list[str]:
    async def read() -> list[str]:
        store = await open_store(url)
        try:
            kv = await store.get(keys.config("VirtualService", "default", "my-app"))
            assert kv is not None
            return [h.get("name", "") for h in decode(kv)["spec"]["http"]]
        finally:
            await store.aclose()

    return trio.run(read)


def figures(requests: int, failures: int) -> Figures:
    return Figures(
        requests, failures, {5.0: requests * 0.9, 50.0: requests, float("inf"): requests}
    )


def test_status_before_and_after_the_controller_started(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rollout", "status", "my-app"]) == 0
    assert "not started by a controller yet" in capsys.readouterr().out
    started(store)
    assert main(["rollout", "status", "my-app"]) == 0
    out = capsys.readouterr().out
    assert "rollout default/my-app  host my-app  phase Progressing" in out
    assert "requests matching user-agent regex '.*Firefox.*' go to v2" in out
    assert main(["rollout", "get", "my-app", "-o", "json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["phase"] == "Progressing"
    assert record["stable"] == "v1"
    assert [h["weight"] for h in record["history"]] == [0]
    assert main(["rollout", "status", "nope"]) == 1
    assert "rollout default/nope not found" in capsys.readouterr().err


def test_pause_resume_and_abort_move_the_rollout_in_one_transaction(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    started(store)
    assert routes(store) == ["my-app-ab", ""]
    assert main(["rollout", "pause", "my-app"]) == 0
    assert "Paused: paused" in capsys.readouterr().out
    assert main(["rollout", "pause", "my-app"]) == 1
    assert "is already paused" in capsys.readouterr().err
    assert main(["rollout", "resume", "my-app"]) == 0
    assert "Progressing: resumed" in capsys.readouterr().out
    assert main(["rollout", "abort", "my-app"]) == 0
    assert "Failed: rolled back to v1: aborted by hand" in capsys.readouterr().out
    assert routes(store) == [""]  # the A/B route went with the rollback
    assert main(["rollout", "promote", "my-app"]) == 1
    assert "already ended (Failed)" in capsys.readouterr().err


def test_ab_report_per_variant_with_the_significance_test(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    started(
        store,
        [
            Window(now - 50, now - 40, {"v1": figures(500, 1), "v2": figures(500, 30)}),
            Window(now - 40, now - 30, {"v1": figures(500, 0), "v2": figures(500, 30)}),
        ],
    )
    assert main(["ab", "report", "my-app", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by = {v["subset"]: v for v in report["variants"]}
    assert (by["v1"]["requests"], by["v2"]["requests"]) == (1000, 1000)
    assert by["v1"]["branch"] == "default"
    assert by["v2"]["branch"] == "match"
    assert by["v2"]["successRate"] == pytest.approx(94.0)
    assert by["v2"]["p50"] == pytest.approx(5 * 500 / 900)
    assert report["comparison"]["significant"] is True
    assert report["test"].startswith("two-proportion z-test")
    assert main(["ab", "report", "my-app", "--since", "35s", "-o", "json"]) == 0
    recent = json.loads(capsys.readouterr().out)
    assert {v["subset"]: v["requests"] for v in recent["variants"]} == {"v1": 500, "v2": 500}
    assert main(["ab", "report", "my-app"]) == 0
    table = capsys.readouterr().out
    assert "v2 vs v1: significant" in table
    assert main(["ab", "report", "other"]) == 1
    assert "no Rollout of host other.default.svc.cluster.local" in capsys.readouterr().err
    assert main(["ab", "report", "my-app", "--since", "soon"]) == 2


def test_watch_follows_until_the_rollout_ends(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    started(store)

    seen: list[str] = []

    async def abort_soon() -> None:
        with trio.fail_after(10):
            while '"Progressing"' not in "".join(seen):  # the watch printed the running state
                await trio.sleep(0.05)
                seen.append(capsys.readouterr().out)
        await trio.to_thread.run_sync(main, ["rollout", "abort", "my-app"])

    async def both() -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(abort_soon)
            code: int = await trio.to_thread.run_sync(
                main, ["rollout", "status", "my-app", "-w", "-o", "json"]
            )
        return code

    assert trio.run(both) == 0
    seen.append(capsys.readouterr().out)
    lines = [json.loads(x) for x in "".join(seen).splitlines() if x.startswith("{")]
    assert [x["phase"] for x in lines] == ["Progressing", "Failed"]
