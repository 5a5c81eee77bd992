"""The agent image (scripts/image) and the agent running in it the DaemonSet's way.

The image is built once per run and cached by content hash; a machine where mmdebstrap, buildah
or podman cannot run fails here (never skips). The containerised pass of scripts/test runs the
enrollment, mTLS and L7 integration tests against agents in this image."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from runtime_lock import parse

from nodeagent.admin.client import admin_json_sync, is_ready
from nodeagent.sandbox import Sandbox, container
from nodeagent.sandbox.system import netns_list

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STORE = container.default_store()
# Linux capability numbers (capability.h) of what the DaemonSet adds.
CAP_BITS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_ADMIN": 21}


@pytest.fixture(scope="session")
def image() -> str:
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "scripts" / "image")], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/image failed ({done.returncode}):\n{done.stderr[-4000:]}")
    tag = done.stdout.splitlines()[-1].split()[0]
    print(f"image {tag}: scripts/image took {time.monotonic() - started:.1f}s")
    return tag


def podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [*container.podman(STORE), *args], capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"podman {args}: {done.stderr}"
    return done.stdout


def run_in_image(image: str, *argv: str) -> str:
    return podman(
        "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
        "--ulimit", "nproc=1024:1024", "--entrypoint", argv[0], image, *argv[1:],
    )  # fmt: skip


def test_the_image_has_exactly_the_pinned_packages_and_no_tooling(image: str) -> None:
    code = (
        "import importlib.metadata as m, importlib.util as u, json; print(json.dumps("
        "[{d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()},"
        " [t for t in ('nodeagent.sandbox', 'nodeagent.demo', 'nodeagent.bench')"
        " if u.find_spec(t)]]))"
    )
    installed, tooling = json.loads(run_in_image(image, "/opt/nodeagent/bin/python", "-c", code))
    pins = parse((ROOT / "daemonset" / "image" / "requirements.txt").read_text())
    assert installed == {**pins, "nodeagent": "0.1.0"}  # no pip, no setuptools
    assert tooling == []


def test_the_image_config_is_the_containerfile_s(image: str) -> None:
    (info,) = json.loads(podman("image", "inspect", image))
    cfg = info["Config"]
    assert cfg["Entrypoint"] == ["nodeagent"]
    assert cfg["User"] == "65532:65532"
    assert {
        "MESH_CNI_PLUGIN_SOURCE=/usr/local/share/nodeagent/mesh-cni",
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
    } <= set(cfg["Env"])
    plugin = run_in_image(image, "cat", "/usr/local/share/nodeagent/mesh-cni")
    assert plugin == (ROOT / "cni-plugin" / "mesh-cni").read_text()
    assert run_in_image(image, "id", "-un").strip() == "nonroot"
    assert "nodeagent run" in run_in_image(image, "nodeagent", "run", "--help")
    print(f"image size {info['Size'] / 1e6:.0f} MB")


def test_a_cached_build_only_checks_and_saves_an_oci_archive(image: str, tmp_path: Path) -> None:
    started = time.monotonic()
    archive = tmp_path / "nodeagent.tar"
    done = subprocess.run(
        [str(ROOT / "scripts" / "image"), "--oci-archive", str(archive)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stderr
    assert done.stdout.split() == [image, done.stdout.split()[1]]  # one line: the tag, the hash
    assert time.monotonic() - started < 120
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert {"oci-layout", "index.json"} <= names
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    (manifest,) = index["manifests"]
    assert manifest["annotations"]["org.opencontainers.image.ref.name"] == image


def test_the_sandbox_runs_the_agent_with_the_daemonset_capabilities_and_mounts() -> None:
    manifest = yaml.safe_load((ROOT / "daemonset" / "base" / "nodeagent.yaml").read_text())
    containers = manifest["spec"]["template"]["spec"]["containers"]
    (agent,) = [c for c in containers if c["name"] == "agent"]
    sc = agent["securityContext"]
    assert tuple(sc["capabilities"]["add"]) == container.AGENT_CAPABILITIES
    argv = container.agent_run_argv(
        STORE, "img", sandbox="s", node="n1", node_netns="s-n1", run_dir="/r/n1"
    )
    assert "--privileged" not in argv
    assert argv[argv.index("--cap-drop") : argv.index("--cap-drop") + 4] == [
        "--cap-drop",
        "all",
        "--cap-add",
        "NET_ADMIN,SYS_ADMIN,NET_RAW",
    ]
    assert sc["readOnlyRootFilesystem"]
    assert "--read-only" in argv
    assert not sc["allowPrivilegeEscalation"]
    assert "no-new-privileges" in argv
    assert sc["runAsUser"] == 0
    assert "0:0" in argv
    mounts = {m["mountPath"]: m.get("mountPropagation") for m in agent["volumeMounts"]}
    assert mounts == {"/run/nodeagent": None, "/run/netns": "HostToContainer", "/tmp": None}
    assert "/r/n1:/run/nodeagent" in argv
    assert "/run/netns:/run/netns:rslave" in argv
    assert "/tmp" in argv[argv.index("--tmpfs") + 1]
    assert argv[argv.index("--network") + 1] == "ns:/run/netns/s-n1"


@pytest.fixture(scope="module")
def sandbox(image: str) -> Iterator[Sandbox]:
    sb = Sandbox.up(f"ci{os.getpid() % 100000}", nodes=1, progress=False, agent_image=image)
    try:
        yield sb
    finally:
        sb.down()


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_the_containerised_agent_has_only_the_daemonset_privileges(sandbox: Sandbox) -> None:
    pid = sandbox.node("n1").agent_pid
    assert pid is not None
    status = _status(pid)
    wanted = sum(1 << bit for bit in CAP_BITS.values())
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[field], 16) == wanted, (field, status[field])
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Uid"].split()[0] == "0"
    # In the node's network namespace (hostNetwork), the root filesystem read-only.
    node_ns = os.stat(f"/run/netns/{sandbox.node('n1').netns}")
    agent_ns = os.stat(f"/proc/{pid}/ns/net")
    assert (agent_ns.st_dev, agent_ns.st_ino) == (node_ns.st_dev, node_ns.st_ino)
    root_mount = next(
        line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        if line.split()[4] == "/"
    )  # fmt: skip
    assert "ro" in root_mount[5].split(",")
    assert "nodeagent run" in " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))


def test_a_pod_is_enrolled_by_the_containerised_agent(sandbox: Sandbox) -> None:
    pod = sandbox.pod_add("n1", "default", "web", ["python3", "-m", "http.server", "8080"])
    pods = admin_json_sync(sandbox.node("n1").admin_socket, "/pods")
    assert [(p["name"], p["state"]) for p in pods] == [("web", "enrolled")]
    assert sandbox.pod_del(pod.name)


def test_down_removes_the_containers(image: str) -> None:
    name = f"cd{os.getpid() % 100000}"
    started = time.monotonic()
    sb = Sandbox.up(name, nodes=1, progress=False, agent_image=image)
    print(f"containerised 1-node sandbox up (agent ready) in {time.monotonic() - started:.1f}s")
    assert is_ready(sb.node("n1").admin_socket)
    assert container.container_name(name, "n1") in podman("ps", "--format", "{{.Names}}")
    sb.down()
    assert container.container_name(name, "n1") not in podman("ps", "-a", "--format", "{{.Names}}")
    assert not [n for n in netns_list() if n.startswith(f"{name}-")]
