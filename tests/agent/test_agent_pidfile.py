"""The run dir's pid file and uninstall lock: real files, real flocks held by real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.agent import pidfile
from nodeagent.agent.main import Agent, AgentConfig

# A process that takes a lock and says so, then sleeps until killed (optionally deaf to SIGTERM).
HOLDER = """
import signal, sys, time
from pathlib import Path
from nodeagent.agent import pidfile
from nodeagent.agent.main import Agent, AgentConfig
if sys.argv[3] == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
take = pidfile.take_agent_pid_file if sys.argv[2] == "agent" else pidfile.take_uninstall_lock
take(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()


def hold(run_dir: Path, which: str, procs: list[subprocess.Popen[str]], deaf: bool = False) -> int:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), which, "deaf" if deaf else "-"],
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    assert p.stdout is not None
    assert p.stdout.readline() == "held\n"  # blocks until the lock is taken
    return p.pid


def test_an_agent_holds_the_pid_file_and_a_second_one_is_refused_by_pid(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    assert pidfile.running_agent(tmp_path) is None
    pid = hold(tmp_path, "agent", holders)
    assert pidfile.running_agent(tmp_path) == pid
    with pytest.raises(pidfile.RunDirBusy, match=f"an agent already runs \\(pid {pid}") as err:
        pidfile.take_agent_pid_file(tmp_path)
    assert err.value.pid == pid


def test_a_file_left_by_a_dead_agent_blocks_nobody(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    hold(tmp_path, "agent", holders)
    holders[0].kill()
    holders[0].wait(timeout=10)
    assert (tmp_path / pidfile.PID_FILE).exists()  # a crash leaves the file, not the lock
    assert pidfile.running_agent(tmp_path) is None
    held = pidfile.take_agent_pid_file(tmp_path)
    assert (tmp_path / pidfile.PID_FILE).read_text() == f"{os.getpid()}\n"
    held.release()
    assert not (tmp_path / pidfile.PID_FILE).exists()


def test_an_agent_does_not_start_while_an_uninstall_runs(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    pid = hold(tmp_path, "uninstall", holders)
    assert pidfile.uninstall_under_way(tmp_path)
    with pytest.raises(pidfile.RunDirBusy, match=f"uninstall` \\(pid {pid}\\) is removing"):
        pidfile.take_agent_pid_file(tmp_path)
    with pytest.raises(pidfile.RunDirBusy, match="an uninstall already runs"):
        pidfile.take_uninstall_lock(tmp_path)


def test_stop_and_wait_returns_once_the_process_exited(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    pid = hold(tmp_path, "agent", holders)
    assert pidfile.stop_and_wait(pid, 10.0)
    assert holders[0].wait(timeout=1) == -15  # SIGTERM ended it
    assert pidfile.running_agent(tmp_path) is None


def test_stop_and_wait_gives_up_on_a_process_that_ignores_sigterm(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    pid = hold(tmp_path, "agent", holders, deaf=True)
    assert not pidfile.stop_and_wait(pid, 0.3)
    assert holders[0].poll() is None
    assert pidfile.running_agent(tmp_path) == pid


async def test_takeover_without_an_admin_socket_to_ask_is_refused_naming_the_holder(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    pid = hold(tmp_path, "agent", holders)
    agent = Agent(AgentConfig(node="n", store_url="memory://", run_dir=tmp_path, takeover=True))
    with pytest.raises(pidfile.RunDirBusy, match=f"pid {pid}.*does not take the handover"):
        await agent.run()
    assert pidfile.running_agent(tmp_path) == pid  # the holder keeps its run dir
