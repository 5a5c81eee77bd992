"""The demo's two programs, for real on loopback: the backend names its version in every
answer, and the load generator counts the answers by version."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.demo.steps import BACKEND, LOAD, SEED, STEADY


@pytest.fixture
def backend_port() -> Iterator[int]:
    # Port 0: the kernel picks a free one; the backend says which once it is bound.
    proc = subprocess.Popen(
        [sys.executable, "-I", str(BACKEND), "v9", "0"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    with proc, proc.stdout:
        try:
            line = proc.stdout.readline()
            assert line.startswith("serving on "), line
            yield int(line.split()[-1])
        finally:
            proc.kill()


def test_load_counts_the_versions_the_backend_names(backend_port: int) -> None:
    done = subprocess.run(
        [sys.executable, "-I", str(LOAD), "127.0.0.1", str(backend_port), "/x", "300", "6"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[:1] == ["progress 250"]
    assert lines[-1].startswith("result ")
    result = json.loads(lines[-1].removeprefix("result "))
    assert result == {"versions": {"v9": 300}, "codes": {"200": 300}, "errors": []}


def test_load_counts_refused_connections_as_errors() -> None:
    # A port nothing listens on (the backend's fixture is not running here): every request fails.
    done = subprocess.run(
        [sys.executable, "-I", str(LOAD), "127.0.0.1", "1", "/", "4", "2"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result = json.loads(done.stdout.splitlines()[-1].removeprefix("result "))
    assert result["versions"] == {"-": 4}
    assert result["codes"] == {"0": 4}
    assert "ConnectionRefusedError" in result["errors"][0]


@pytest.mark.parametrize("argv", [[], ["v1", "http"], ["v1", "80", "x"]])
def test_the_backend_rejects_bad_arguments_by_name(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-I", str(BACKEND), *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "usage: backend.py VERSION [PORT]" in done.stderr


def test_the_seed_examples_are_found_beside_the_checkout() -> None:
    checkout = Path(__file__).resolve().parents[2]
    assert checkout.parent / "shared" / "corpus" / "seed" == SEED
    assert {p.name for p in SEED.glob("*.yaml")} >= {
        "01-canary.yaml",
        "02-fault-delay.yaml",
        "03-ab-user-agent.yaml",
    }


def test_a_missing_corpus_is_a_clear_error_before_any_sandbox(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "seed"
    code = (
        "import pathlib, sys; import nodeagent.demo.runner as r; "
        f"r.SEED = pathlib.Path({str(missing)!r}); sys.exit(r.main(['--name', 'nocorpus']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert f"the article's examples are missing at {missing}" in done.stderr
    assert "../shared/corpus/seed" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_backend_fails_every_nth_request_when_asked() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-I", str(BACKEND), "bad", "0", "--fail-every", "10"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    with proc, proc.stdout:
        try:
            port = int(proc.stdout.readline().split()[-1])
            done = subprocess.run(
                [sys.executable, "-I", str(LOAD), "127.0.0.1", str(port), "/", "100", "4"],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
        finally:
            proc.kill()
    result = json.loads(done.stdout.splitlines()[-1].removeprefix("result "))
    assert result["codes"] == {"200": 90, "500": 10}


def test_steady_load_paces_and_stops_on_sigterm(backend_port: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-I", str(STEADY), "127.0.0.1", str(backend_port), "/", "40", "30",
         "ua-a", "ua-b"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    with proc, proc.stdout:
        started = float(proc.stdout.readline().split()[1])
        time.sleep(1.0)  # the load runs for a measured second; the stop is the signal's
        proc.terminate()
        result = json.loads(proc.stdout.readline().removeprefix("result "))
    requests = result["requests"]
    assert 20 <= len(requests) <= 60  # ~40/s for ~1 s
    assert {r[1] for r in requests} == {200}
    assert {r[2] for r in requests} == {"v9"}
    assert {r[3] for r in requests} == {0, 1}
    assert all(r[0] >= started for r in requests)
