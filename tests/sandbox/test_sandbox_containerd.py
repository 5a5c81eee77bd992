"""The sandbox's containerd: its pure parts (paths, config, mounts, the chain it gets), and for
real (root) that `down` removes a containerd left running with a pod in it."""

from __future__ import annotations

import secrets
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from nodeagent.sandbox import Sandbox, SandboxError, layout
from nodeagent.sandbox.containerd import APPLETS, Containerd, make_rootfs
from nodeagent.sandbox.containerd_config import (
    ContainerdPaths,
    config_toml,
    containerd_paths,
    launch_script,
    node_conflist,
)
from nodeagent.sandbox.system import netns_list

ROOT = Path("/run/nodeagent-sandbox/t1/n1/containerd")


def test_everything_lives_under_the_node_dir() -> None:
    paths = containerd_paths(layout.node_paths(Path("/run/nodeagent-sandbox/t1"), "n1"))
    assert paths.root == ROOT
    doc = tomllib.loads(config_toml(paths))
    assert doc["root"] == f"{ROOT}/root"
    assert doc["state"] == f"{ROOT}/state"
    assert doc["grpc"]["address"] == f"{ROOT}/containerd.sock"
    assert doc["ttrpc"]["address"] == f"{ROOT}/containerd.sock.ttrpc"
    assert doc["plugins"]["io.containerd.internal.v1.opt"]["path"] == f"{ROOT}/opt"
    # ctr calls CNI itself; containerd's CRI plugin would read /etc/cni/net.d on its own.
    assert doc["disabled_plugins"] == ["io.containerd.grpc.v1.cri"]
    assert paths.cached_result("t1-web") == ROOT / "cni/results/mesh-t1-web-eth0"


def test_launch_script_binds_the_fixed_paths_then_execs_containerd() -> None:
    paths = ContainerdPaths(Path("/tmp/a dir/containerd"))
    lines = launch_script(paths).splitlines()
    assert lines[0] == "set -e"
    mounts = [shlex.split(line)[2:] for line in lines[1:-1]]
    assert mounts == [
        ["/tmp/a dir/containerd/net.d", "/etc/cni/net.d"],
        ["/tmp/a dir/containerd/bin", "/opt/cni/bin"],
        ["/tmp/a dir/containerd/cni", "/var/lib/cni"],
        ["/tmp/a dir/containerd/run", "/run/containerd"],
    ]
    assert shlex.split(lines[-1]) == [
        "exec",
        "containerd",
        "--config",
        "/tmp/a dir/containerd/config.toml",
    ]


def test_chain_is_the_nodes_with_unnamed_pods_enrolled() -> None:
    node = layout.node_paths(Path("/run/nodeagent-sandbox/t1"), "n1")
    chain = layout.conflist(1, node)
    doc = node_conflist(chain, containerd_paths(node))
    assert [p["type"] for p in doc["plugins"]] == ["loopback", "bridge", "mesh-cni"]
    assert doc["plugins"][1] == chain["plugins"][1]  # the same bridge and address pool
    assert doc["plugins"][2] == {
        **chain["plugins"][2],
        "unnamedPods": {"namespace": "default"},
        "logFile": f"{ROOT}/mesh-cni.log",
    }
    assert "unnamedPods" not in chain["plugins"][2]  # the node's own is untouched
    plain = node_conflist(layout.conflist(1, node, mesh_cni=False), containerd_paths(node))
    assert [p["type"] for p in plain["plugins"]] == ["loopback", "bridge"]
    with pytest.raises(SandboxError, match="'plugins' must be a non-empty list"):
        node_conflist({"name": "x", "cniVersion": "1.0.0", "plugins": []}, containerd_paths(node))


def test_rootfs_is_busybox_and_its_applets(tmp_path: Path) -> None:
    fake = tmp_path / "busybox"
    fake.write_bytes(b"\x7fELF")
    make_rootfs(tmp_path / "rootfs", fake)
    make_rootfs(tmp_path / "rootfs", fake)  # again: harmless
    bin_dir = tmp_path / "rootfs" / "bin"
    assert (bin_dir / "busybox").read_bytes() == b"\x7fELF"
    for applet in APPLETS:
        assert (bin_dir / applet).readlink() == Path("busybox")
    with pytest.raises(SandboxError, match="install Debian's busybox-static"):
        make_rootfs(tmp_path / "other", tmp_path / "missing")


def test_container_id_is_namespace_dash_name() -> None:
    node = layout.node_paths(Path("/run/nodeagent-sandbox/t1"), "n1")
    assert Containerd("t1", "t1-n1", node).container_id("web") == "t1-web"


@pytest.mark.root
@pytest.mark.slow
def test_down_removes_a_running_containerd_and_its_pod() -> None:
    name = f"t{secrets.token_hex(3)}"
    sb = Sandbox.up(name, nodes=1, agents=False, mesh_cni=False, progress=False)
    try:
        ctrd = sb.containerd("n1")
        ctrd.start()
        pod = ctrd.run_pod("web", ["sleep", "3600"])
        assert pod.ip.startswith("10.201.1.")
        assert ctrd.containers() == ["web"]
        shim_argv = ["pgrep", "-f", "--", f"-address {ctrd.paths.socket}"]
        assert subprocess.run(shim_argv, capture_output=True).returncode == 0
        assert ctrd.process is not None
        containerd_pid = ctrd.process
    finally:
        sb.down()
    assert not containerd_pid.alive()
    assert pod.proc.wait(timeout=10) is not None
    assert subprocess.run(shim_argv, capture_output=True).returncode == 1, "a shim is left"
    assert not ctrd.paths.root.exists()
    assert [n for n in netns_list() if n.startswith(f"{name}-")] == []
    assert list(Path("/sys/fs/cgroup").glob(f"*/{name}")) == []
