"""A node's agent as a container (`sandbox up --agent-image TAG`): podman, run the DaemonSet's way.

The container gets exactly what `daemonset/base/nodeagent.yaml` gives the agent container:
uid 0, capabilities NET_ADMIN, SYS_ADMIN and NET_RAW and no other (not privileged), no privilege
escalation, a read-only root filesystem with a writable /tmp, the node's `/run/nodeagent` (here
the node's run dir) and `/run/netns` with HostToContainer (rslave) propagation, and the node's
network (hostNetwork: here `--network ns:` of the node's namespace, so podman makes no network
of its own). With the sqlite store, the store's directory is mounted at its own path, as the
embedded overlay mounts /var/lib/nodeagent.

podman runs on storage this code owns (the image store of scripts/image), never the machine's,
with the same global flags as scripts/image. Limits of this machine, not of the agent: crun
refuses its hybrid cgroup layout (runc is used), raising RLIMIT_NOFILE/NPROC is refused (the
container gets this process's nofile and nproc=4096), and its PID 1 reaps no orphans, so each
container's exited `conmon` stays a zombie (in podman's own `libpod_parent` cgroups) until the
machine restarts.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from nodeagent.sandbox.errors import SandboxError

# The DaemonSet's securityContext.capabilities.add, exactly.
AGENT_CAPABILITIES = ("NET_ADMIN", "SYS_ADMIN", "NET_RAW")
RUN_DIR_IN_CONTAINER = "/run/nodeagent"
NPROC = 4096
START_TIMEOUT = 30.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_store() -> Path:
    """scripts/image's store: $MESH_IMAGE_STORE or <repo>/.image."""
    return Path(os.environ.get("MESH_IMAGE_STORE") or REPO_ROOT / ".image").resolve()


def podman(store: Path) -> list[str]:
    """podman on our own storage; the same global flags as scripts/image."""
    return [
        "podman",
        "--root", str(store / "storage"),
        "--runroot", str(store / "run"),
        "--storage-driver", "overlay",
        "--tmpdir", str(store / "tmp"),
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "none",
        "--network-config-dir", str(store / "net"),
        "--runtime", "runc",
    ]  # fmt: skip


def container_name(sandbox: str, node: str) -> str:
    return f"nodeagent-{sandbox}-{node}"


def agent_run_argv(
    store: Path,
    image: str,
    *,
    sandbox: str,
    node: str,
    node_netns: str,
    run_dir: str,
    extra_mounts: Sequence[str] = (),
    agent_args: Sequence[str] = (),
) -> list[str]:
    """`podman run` of the agent in the foreground (its output is the agent's log)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    argv = [
        *podman(store), "run", "--rm", "--replace",
        "--name", container_name(sandbox, node),
        "--network", f"ns:/run/netns/{node_netns}",
        "--user", "0:0",
        "--cap-drop", "all", "--cap-add", ",".join(AGENT_CAPABILITIES),
        "--security-opt", "no-new-privileges",
        "--read-only", "--tmpfs", "/tmp",
        "--volume", f"{run_dir}:{RUN_DIR_IN_CONTAINER}",
        "--volume", "/run/netns:/run/netns:rslave",
        "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={NPROC}:{NPROC}",
        "--env", f"NODE_NAME={node}",
        "--stop-timeout", "30",
    ]  # fmt: skip
    for mount in extra_mounts:
        argv += ["--volume", f"{mount}:{mount}"]
    return [*argv, image, "run", "--run-dir", RUN_DIR_IN_CONTAINER, *agent_args]


def check_image(store: Path, image: str) -> None:
    """The image must exist in our store: the sandbox never pulls."""
    if not (store / "storage").is_dir():
        raise SandboxError(f"no image store at {store}; build the image with scripts/image")
    done = _podman(store, "image", "exists", image)
    if done.returncode != 0:
        raise SandboxError(
            f"image {image!r} is not in the store {store}: build it with "
            f"`scripts/image --tag {image}` (the sandbox never pulls from a registry)"
        )


def wait_container_pid(store: Path, name: str, client: subprocess.Popen[bytes], log: Path) -> int:
    """The agent's pid (in this machine's pid namespace) once podman has started it."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        done = _podman(store, "inspect", "--format", "{{.State.Pid}}", name)
        pid = done.stdout.strip()
        if done.returncode == 0 and pid.isdigit() and int(pid) > 0:
            return int(pid)
        if client.poll() is not None:
            raise SandboxError(
                f"podman run of {name} exited with {client.returncode}; see {log}: "
                + log.read_text(errors="replace")[-2000:]
            )
        time.sleep(0.1)
    raise SandboxError(f"container {name} did not start within {START_TIMEOUT:.0f}s; see {log}")


def remove_container(store: Path, name: str) -> None:
    """Gone, whatever its state (stopped agent, podman client killed): idempotent."""
    done = _podman(store, "rm", "--force", "--ignore", "--time", "0", name)
    if done.returncode != 0:
        raise SandboxError(f"podman rm {name}: {done.stderr.strip()}")


def _podman(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*podman(store), *args], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise SandboxError("podman is not installed; run scripts/bootstrap") from None
    except subprocess.TimeoutExpired as e:
        raise SandboxError(f"podman {' '.join(args)}: timed out") from e
