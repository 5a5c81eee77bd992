"""install-cni on a temporary conf dir: insert, idempotence, repair, uninstall, .conf conversion."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import install
from nodeagent.cni.install import STATE_FILE, InstallError, Options, main, reconcile, uninstall

# Deliberately not in our own formatting, so byte-identical restores are meaningful.
BRIDGE_CONFLIST = b"""{ "cniVersion": "1.0.0", "name": "podnet",
  "plugins": [ {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local",
     "ranges": [[{"subnet": "10.22.0.0/16"}]]}},
     {"type": "portmap", "capabilities": {"portMappings": true}} ] }
"""
BRIDGE_CONF = b"""{"cniVersion":"0.4.0","name":"podnet","type":"bridge","bridge":"cni0",
"ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}
"""


@pytest.fixture
def dirs(tmp_path: Path) -> Options:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    return Options(conf_dir=conf_dir, bin_dir=bin_dir, agent_socket="/run/test/cni.sock")


def plugins(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_bytes())
    result: list[dict[str, Any]] = doc["plugins"]
    return result


def cli(opts: Options, *extra: str) -> list[str]:
    return [
        "--cni-conf-dir",
        str(opts.conf_dir),
        "--cni-bin-dir",
        str(opts.bin_dir),
        "--agent-socket",
        opts.agent_socket,
        *extra,
    ]


def listing(opts: Options) -> list[str]:
    return sorted(os.listdir(opts.conf_dir))


def test_insert_last_and_install_binary(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    path.chmod(0o644)
    assert main(cli(dirs)) == 0
    types = [p["type"] for p in plugins(path)]
    assert types == ["bridge", "portmap", "mesh-cni"]
    assert plugins(path)[-1] == {
        "type": "mesh-cni",
        "agentSocket": "/run/test/cni.sock",
        "excludeNamespaces": ["kube-system"],
        "logLevel": "info",
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert listing(dirs) == [STATE_FILE, "10-bridge.conflist"]
    binary = dirs.bin_dir / "mesh-cni"
    assert binary.read_bytes().startswith(f"#!{sys.executable} -IS\n".encode())
    assert os.access(binary, os.X_OK)
    out = subprocess.run(
        [str(binary)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True, timeout=20
    )
    assert json.loads(out.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]


def test_idempotent(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    reconcile(dirs)
    first = path.read_bytes()
    state = (dirs.conf_dir / STATE_FILE).read_bytes()
    assert reconcile(dirs).empty
    assert main(cli(dirs)) == 0
    assert path.read_bytes() == first
    assert (dirs.conf_dir / STATE_FILE).read_bytes() == state
    assert [p["type"] for p in plugins(path)].count("mesh-cni") == 1


def test_uninstall_restores_byte_identical(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    reconcile(dirs)
    assert main(cli(dirs, "--uninstall")) == 0
    assert path.read_bytes() == BRIDGE_CONFLIST
    assert listing(dirs) == ["10-bridge.conflist"]
    assert not (dirs.bin_dir / "mesh-cni").exists()
    # Uninstalling twice is fine.
    assert main(cli(dirs, "--uninstall")) == 0


def test_repair_after_primary_rewrites(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    reconcile(dirs)
    rewritten = BRIDGE_CONFLIST.replace(b"10.22.0.0/16", b"10.23.0.0/16")
    path.write_bytes(rewritten)
    assert not reconcile(dirs).empty
    assert [p["type"] for p in plugins(path)] == ["bridge", "portmap", "mesh-cni"]
    assert "10.23.0.0/16" in path.read_text()
    uninstall(dirs)
    assert path.read_bytes() == rewritten


def test_primary_appends_after_us_moves_us_last(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    reconcile(dirs)
    doc = json.loads(path.read_bytes())
    doc["plugins"].append({"type": "tuning"})
    path.write_text(json.dumps(doc))
    reconcile(dirs)
    assert [p["type"] for p in plugins(path)] == ["bridge", "portmap", "tuning", "mesh-cni"]
    uninstall(dirs)
    # Our file was changed since we wrote it: strip ours, keep the others' change.
    assert [p["type"] for p in plugins(path)] == ["bridge", "portmap", "tuning"]


def test_settings_change_updates_entry_but_keeps_original(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    reconcile(dirs)
    other = Options(dirs.conf_dir, dirs.bin_dir, agent_socket="/run/other.sock")
    assert not reconcile(other).empty
    assert plugins(path)[-1]["agentSocket"] == "/run/other.sock"
    uninstall(other)
    assert path.read_bytes() == BRIDGE_CONFLIST


def test_conf_converted_to_conflist_and_back(dirs: Options) -> None:
    conf = dirs.conf_dir / "10-bridge.conf"
    conf.write_bytes(BRIDGE_CONF)
    conf.chmod(0o640)
    reconcile(dirs)
    conflist = dirs.conf_dir / "10-bridge.conflist"
    assert listing(dirs) == [STATE_FILE, "10-bridge.conflist"]
    doc = json.loads(conflist.read_bytes())
    assert (doc["cniVersion"], doc["name"]) == ("0.4.0", "podnet")
    assert doc["plugins"][0] == json.loads(BRIDGE_CONF)
    assert doc["plugins"][1]["type"] == "mesh-cni"
    assert stat.S_IMODE(conflist.stat().st_mode) == 0o640
    assert reconcile(dirs).empty
    uninstall(dirs)
    assert listing(dirs) == ["10-bridge.conf"]
    assert conf.read_bytes() == BRIDGE_CONF
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640


def test_conf_rewritten_by_primary_is_reconverted(dirs: Options) -> None:
    conf = dirs.conf_dir / "10-bridge.conf"
    conf.write_bytes(BRIDGE_CONF)
    reconcile(dirs)
    new_conf = BRIDGE_CONF.replace(b"cni0", b"cni1")
    conf.write_bytes(new_conf)  # the primary CNI writes its file again
    reconcile(dirs)
    conflist = dirs.conf_dir / "10-bridge.conflist"
    assert listing(dirs) == [STATE_FILE, "10-bridge.conflist"]
    assert plugins(conflist)[0]["bridge"] == "cni1"
    assert plugins(conflist)[-1]["type"] == "mesh-cni"
    uninstall(dirs)
    assert conf.read_bytes() == new_conf


def test_conversion_refuses_to_clobber_foreign_conflist(dirs: Options) -> None:
    (dirs.conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    (dirs.conf_dir / "10-bridge.conflist").write_bytes(b"not json")
    with pytest.raises(InstallError, match="already exists and is not ours"):
        reconcile(dirs)
    assert main(cli(dirs)) == 1
    assert (dirs.conf_dir / "10-bridge.conflist").read_bytes() == b"not json"


def test_picks_first_valid_config_by_name(dirs: Options) -> None:
    (dirs.conf_dir / "00-broken.conflist").write_bytes(b"{")
    (dirs.conf_dir / "05-a.conflist").write_bytes(BRIDGE_CONFLIST)
    (dirs.conf_dir / "10-b.conflist").write_bytes(BRIDGE_CONFLIST)
    (dirs.conf_dir / "README").write_text("ignored")
    reconcile(dirs)
    assert plugins(dirs.conf_dir / "05-a.conflist")[-1]["type"] == "mesh-cni"
    assert (dirs.conf_dir / "10-b.conflist").read_bytes() == BRIDGE_CONFLIST
    assert (dirs.conf_dir / "00-broken.conflist").read_bytes() == b"{"


def test_primary_moves_to_new_file(dirs: Options) -> None:
    old = dirs.conf_dir / "10-bridge.conflist"
    old.write_bytes(BRIDGE_CONFLIST)
    reconcile(dirs)
    new = dirs.conf_dir / "05-cilium.conflist"
    new.write_bytes(BRIDGE_CONFLIST.replace(b"podnet", b"cilium"))
    reconcile(dirs)
    assert old.read_bytes() == BRIDGE_CONFLIST
    assert plugins(new)[-1]["type"] == "mesh-cni"
    uninstall(dirs)
    assert new.read_bytes() == BRIDGE_CONFLIST.replace(b"podnet", b"cilium")


def test_no_config_yet(dirs: Options, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(cli(dirs)) == 1
    assert "no valid CNI network config yet" in capsys.readouterr().err


def test_missing_conf_dir_is_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = Options(conf_dir=tmp_path / "nope", bin_dir=tmp_path / "bin")
    assert main(cli(opts)) == 1
    assert f"read CNI conf dir {tmp_path / 'nope'}" in capsys.readouterr().err


def test_relative_socket_rejected(dirs: Options) -> None:
    assert main([*cli(dirs)[:4], "--agent-socket", "cni.sock"]) == 2


def test_watch_repairs_until_stopped(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    rounds: list[list[str]] = []

    def fake_sleep(seconds: float) -> None:
        assert seconds == 1.0
        rounds.append([p["type"] for p in plugins(path)])
        if len(rounds) == 1:
            path.write_bytes(BRIDGE_CONFLIST)  # the primary CNI rewrites its config

    install.watch(dirs, should_stop=lambda: len(rounds) >= 2, sleep=fake_sleep)
    assert rounds == [["bridge", "portmap", "mesh-cni"]] * 2


def _watch_until(path: Path, needle: bytes, timeout: float = 20.0) -> None:
    # An integration test of a real process: poll the file it repairs, bounded.
    deadline = time.monotonic() + timeout
    while needle not in path.read_bytes():
        assert time.monotonic() < deadline, f"{path} never got {needle!r}"
        time.sleep(0.05)


@pytest.mark.slow
def test_watch_process_repairs_and_exits_on_sigterm(dirs: Options) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    code = "import sys; from nodeagent.cni.install import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *cli(dirs, "--watch")], stdout=subprocess.DEVNULL
    )
    try:
        path.write_bytes(BRIDGE_CONFLIST)  # the primary CNI shows up after us
        _watch_until(path, b"mesh-cni")
        path.write_bytes(BRIDGE_CONFLIST)  # and rewrites its config
        _watch_until(path, b"mesh-cni")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    uninstall(dirs)
    assert path.read_bytes() == BRIDGE_CONFLIST


def test_watch_uninstalls_while_flag_says_so_and_stays_out(dirs: Options, tmp_path: Path) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    flag = tmp_path / "cni-uninstall"
    flag.write_text("false")
    rounds: list[list[str]] = []

    def fake_sleep(seconds: float) -> None:
        rounds.append([p["type"] for p in plugins(path)])
        if len(rounds) == 1:
            flag.write_text("true\n")  # the uninstall path flips the ConfigMap key
        if len(rounds) == 2:
            path.write_bytes(BRIDGE_CONFLIST)  # the primary rewrites: we must not come back

    install.watch(dirs, should_stop=lambda: len(rounds) >= 3, sleep=fake_sleep, uninstall_flag=flag)
    assert rounds == [
        ["bridge", "portmap", "mesh-cni"],
        ["bridge", "portmap"],
        ["bridge", "portmap"],
    ]
    assert path.read_bytes() == BRIDGE_CONFLIST
    assert not (dirs.bin_dir / "mesh-cni").exists()
    assert not (dirs.conf_dir / STATE_FILE).exists()


@pytest.mark.parametrize("flag_text", [None, "false", "yes"])
def test_stop_without_uninstall_flag_keeps_the_chain(
    dirs: Options, tmp_path: Path, flag_text: str | None
) -> None:
    """A restart or upgrade (SIGTERM, flag absent or not "true") leaves mesh-cni chained."""
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    flag = tmp_path / "cni-uninstall"
    if flag_text is not None:
        flag.write_text(flag_text)
    rounds: list[int] = []
    install.watch(
        dirs,
        should_stop=lambda: len(rounds) >= 1,
        sleep=lambda s: rounds.append(1),
        uninstall_flag=flag,
    )
    assert [p["type"] for p in plugins(path)][-1] == "mesh-cni"
    assert (dirs.bin_dir / "mesh-cni").exists()


@pytest.mark.slow
def test_watch_process_uninstalls_on_sigterm_only_when_flagged(
    dirs: Options, tmp_path: Path
) -> None:
    path = dirs.conf_dir / "10-bridge.conflist"
    path.write_bytes(BRIDGE_CONFLIST)
    flag = tmp_path / "cni-uninstall"
    flag.write_text("false")
    code = "import sys; from nodeagent.cni.install import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        sys.executable,
        "-c",
        code,
        *cli(
            dirs, "--watch", "--uninstall-flag", str(flag), "--host-interpreter", "/usr/bin/python3"
        ),
    ]
    for flagged in (False, True):
        uninstall(dirs)  # so that seeing mesh-cni means this process is up and watching
        flag.write_text("false")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            _watch_until(path, b"mesh-cni")
            # Written after the process saw the chain: the value at SIGTERM decides.
            flag.write_text("true" if flagged else "false")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if flagged:
            assert path.read_bytes() == BRIDGE_CONFLIST
            assert not (dirs.bin_dir / "mesh-cni").exists()
        else:
            assert b"mesh-cni" in path.read_bytes()
            assert (dirs.bin_dir / "mesh-cni").read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")
