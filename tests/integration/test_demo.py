"""`scripts/demo` end to end: the whole story on a real 2-node sandbox exits 0 with its key
evidence printed and leaves nothing behind; interrupted mid-story (SIGINT, as Ctrl-C sends), it
still removes every namespace of its sandbox and its state directory."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STATE_ROOT = Path("/run/nodeagent-sandbox")


def _netns(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(f"{name}-")]


def _start(name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "nodeagent.demo", "--name", name],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a SIGINT for the test runner never reaches it, and vice versa
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_demo_tells_the_story_and_exits_0() -> None:
    name = f"dm{os.getpid() % 100000}"
    proc = _start(name)
    started = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        _stop(proc)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, output[-6000:]
    for line in (
        "Canary release: 90% to v1, 10% to v2",
        "within the 99.9% binomial interval of the configured weights: yes",
        "Moving the canary: 50/50, then 100/0",
        "A/B test by User-Agent",
        "Succeeded: promoted: all traffic to v2",
        "Failed: rolled back to v2: 2 failed check(s)",
        "STRICT: plaintext refused",
        "mutual_tls",
        "destination_version",
        "demo OK",
    ):
        assert line in output, f"missing {line!r} in:\n{output[-6000:]}"
    assert "HTTP 200 after 7." in output, output[-3000:]
    assert "✗" not in output
    assert _netns(name) == []
    assert not (STATE_ROOT / name).exists()
    print(f"demo took {elapsed:.1f}s")
    assert elapsed < 150, f"the demo took {elapsed:.0f}s (target ~90 s)"


def test_ctrl_c_mid_story_cleans_up() -> None:
    name = f"di{os.getpid() % 100000}"
    proc = _start(name)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while not any("Canary release" in line for line in seen):
            assert time.monotonic() < deadline, "".join(seen[-40:])
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                assert line, f"the demo ended before the canary step:\n{''.join(seen[-40:])}"
                seen.append(line)
        assert _netns(name), "the sandbox should exist mid-story: the test would prove nothing"
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    finally:
        _stop(proc)
    assert proc.returncode == 130, rest[-3000:]
    assert "interrupted" in rest
    assert _netns(name) == []
    assert not (STATE_ROOT / name).exists()
