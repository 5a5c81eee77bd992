"""containerd in one node of the sandbox: pods made by a real runtime (`ctr run --cni`).

containerd runs inside the node's network namespace (`nsenter --net`, not `ip netns exec`: that
remounts /sys and hides the cgroup mounts runc needs) and in a private mount namespace of its
own, where the fixed paths containerd, its shim and ctr's libcni use are bind mounts of
directories under `<state>/<node>/containerd/` (containerd_config.py):

| fixed path | bound from | what |
| --- | --- | --- |
| `/etc/cni/net.d` | `net.d/` | the node's chain (loopback, bridge/host-local, mesh-cni) |
| `/opt/cni/bin` | `bin/` | mesh-cni (install-cni's copy); the rest from `/usr/lib/cni` |
| `/var/lib/cni` | `cni/` | libcni's cache of ADD results (`results/mesh-<id>-eth0`) |
| `/run/containerd` | `run/` | shim sockets, runc's state, ctr's FIFOs |

Only the four mount points are made on the machine when missing (empty directories, never
written: the writes land in the bind mounts); nothing goes into the machine's own network
namespace. containerd's root and state dirs and its socket are under the same directory.

`ctr run --cni` runs the CNI chain itself (go-cni over libcni) in the node's namespace: ADD with
`CNI_NETNS=/proc/<task pid>/ns/net` before the task starts, no CNI_ARGS at all, and DEL (with
`CNI_NETNS=""` and the cached result) when the task exits. CNI_CONTAINERID is `<containerd
namespace>-<id>`, and mesh-cni's `unnamedPods` names the pod after it. The containerd namespace
is the sandbox's name, so the containers' cgroups (`/<namespace>/<id>`) of two sandboxes never
meet; `stop` removes the emptied `<namespace>` cgroup directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.cni.install import DEFAULT_PLUGIN_SOURCE, install_binary
from nodeagent.sandbox import cni, layout
from nodeagent.sandbox.containerd_config import (
    IFNAME,
    ContainerdPaths,
    config_toml,
    containerd_paths,
    launch_script,
    node_conflist,
)
from nodeagent.sandbox.errors import SandboxError
from nodeagent.sandbox.system import ProcessRef, spawn, stop_all

BUSYBOX = Path("/bin/busybox")  # Debian busybox-static: the pods' whole root filesystem
# Not wget: the static build crashes in glibc's resolver code, which wants NSS libraries.
APPLETS = ("sh", "sleep", "nc", "httpd", "ip", "cat", "echo", "ls")
START_TIMEOUT = 20.0
CTR_TIMEOUT = 30.0
GRACE = 10.0
# Our child processes (containerd, the foreground `ctr run`s) of every Containerd object, so the
# one `down` makes reaps what another started.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def make_rootfs(rootfs: Path, busybox: Path = BUSYBOX) -> None:
    """A root filesystem of one static busybox and its applets (no image registry)."""
    if not busybox.is_file():
        raise SandboxError(f"{busybox} is missing: install Debian's busybox-static")
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        link = rootfs / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")


@dataclass(frozen=True, slots=True)
class CtrPod:
    """A container `ctr run --cni --rm` runs in the foreground: its ctr process is the runtime
    side of the pod (it made the ADD and makes the DEL when the task ends)."""

    name: str
    container_id: str  # CNI_CONTAINERID, also the pod's name in the mesh (`unnamedPods`)
    proc: subprocess.Popen[bytes]
    log: Path
    ip: str


class Containerd:
    """One node's containerd. `start` it, run pods with `run_pod`, `stop` it (idempotent)."""

    def __init__(self, namespace: str, node_netns: str, node_paths: layout.NodePaths) -> None:
        self.namespace = namespace  # containerd's (ctr -n): the sandbox's name
        self.node_netns = node_netns
        self.node_paths = node_paths
        self.paths = containerd_paths(node_paths)
        self.process: ProcessRef | None = _read_process(self.paths)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start containerd (again, after a kill: the shims and the cache stay) and wait until
        it answers."""
        for tool in ("containerd", "ctr", "nsenter", "unshare"):
            if shutil.which(tool) is None:
                raise SandboxError(
                    f"{tool} not found: install Debian's containerd (and util-linux)"
                )
        if self.process is not None and self.process.alive():
            raise SandboxError(
                f"containerd of {self.node_netns} already runs (pid {self.process.pid})"
            )
        p = self.paths
        for d in (p.root, p.conf_dir, p.bin_dir, p.cni_cache, p.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        for _, target in p.binds():
            Path(target).mkdir(parents=True, exist_ok=True)  # an empty mount point, never written
        p.config.write_text(config_toml(p))
        try:
            chain = json.loads(self.node_paths.conflist.read_text())
        except (OSError, ValueError) as e:
            raise SandboxError(f"cannot read the node's CNI config: {e}") from e
        conflist = p.conf_dir / layout.CONFLIST_NAME
        conflist.write_text(json.dumps(node_conflist(chain, p), indent=2))
        install_binary(p.bin_dir, DEFAULT_PLUGIN_SOURCE, "/usr/bin/python3")
        make_rootfs(p.rootfs)
        argv = [
            "nsenter",
            f"--net=/run/netns/{self.node_netns}",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            launch_script(p),
        ]
        proc, ref = spawn(argv, log=p.log)
        _CHILDREN[proc.pid] = proc
        self.process = ref
        p.process_file.write_text(json.dumps(ref.to_json()))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise SandboxError(
                    f"containerd exited with status {proc.returncode}; {p.log}:\n{_tail(p.log)}"
                )
            if self.ctr("version", check=False, timeout=5).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"containerd not answering after {START_TIMEOUT:g}s; {p.log}")
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9 containerd (its shims and their tasks live on, as on a node)."""
        if self.process is not None:
            stop_all([self.process], grace=0, children=_CHILDREN, first=signal.SIGKILL)

    def stop(self) -> None:
        """Every container removed through containerd (started again if it was killed), then
        containerd itself, then leftover shims of ours (by the socket address in their command
        line), the emptied cgroup parents, and the directory. Needs the node's agent still
        running: the containers' DELs go through mesh-cni."""
        if self.process is not None and not self.process.alive():
            with contextlib.suppress(SandboxError):
                self.start()  # after a kill: it finds its shims again and cleans up after them
        if self.process is not None and self.process.alive():
            with contextlib.suppress(SandboxError):
                self._remove_containers()
            stop_all([self.process], grace=GRACE, children=_CHILDREN)
        for c in self._ctr_runs():
            c.kill()
            c.wait()
            _CHILDREN.pop(c.pid, None)
        for pid in _processes_naming(str(self.paths.socket)):
            for child in _descendants(pid):
                _kill(child)
            _kill(pid)
        _remove_empty_cgroups(self.namespace)
        shutil.rmtree(self.paths.root, ignore_errors=True)

    def _remove_containers(self) -> None:
        for name in self.containers():
            self.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        # A foreground `ctr run --rm` DELs and removes its container once its task has ended.
        _wait_until(lambda: not self.containers(), GRACE)
        for name in self.containers():  # no ctr run left for these: their DEL is ours to make
            self.ctr("task", "delete", "--force", name, check=False)
            self.ctr("container", "delete", name, check=False)
            self.delete_network(name)

    def _ctr_runs(self) -> list[subprocess.Popen[bytes]]:
        ours = f"--address={self.paths.socket}"
        return [c for c in _CHILDREN.values() if isinstance(c.args, list) and ours in c.args]

    def container_id(self, name: str) -> str:
        """CNI_CONTAINERID of ctr's container `name` (go-cni is given `<namespace>-<id>`)."""
        return f"{self.namespace}-{name}"

    # -- ctr -----------------------------------------------------------------------------------

    def ctr_argv(self, *args: str) -> list[str]:
        """ctr in containerd's mount and network namespaces (its CNI dirs and the node's net)."""
        if self.process is None:
            raise SandboxError("containerd is not started")
        return [
            "nsenter",
            f"--target={self.process.pid}",
            "--mount",
            "--net",
            "ctr",
            f"--address={self.paths.socket}",
            f"--namespace={self.namespace}",
            *args,
        ]

    def ctr(
        self, *args: str, check: bool = True, timeout: float = CTR_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(
                self.ctr_argv(*args), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise SandboxError(f"ctr {' '.join(args)}: no answer within {timeout:g}s") from e
        if check and done.returncode != 0:
            raise SandboxError(f"ctr {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
        return done

    def containers(self) -> list[str]:
        return self.ctr("container", "list", "--quiet").stdout.split()

    def spawn_pod(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """`ctr run --cni --rm` in the foreground (it DELs when the task ends); returns at once."""
        layout.check_object_name("container", self.container_id(name))
        log = self.paths.root / f"{name}.log"
        proc, _ = spawn(
            self.ctr_argv(
                "run",
                "--rm",
                "--cni",
                "--rootfs",
                f"--fifo-dir={self.paths.run_dir / 'fifo'}",
                "--env=PATH=/bin",  # no image, so no image config to give one
                str(self.paths.rootfs),
                name,
                *argv,
            ),
            log=log,
        )
        _CHILDREN[proc.pid] = proc
        return proc

    def run_pod(self, name: str, argv: Sequence[str], *, timeout: float = CTR_TIMEOUT) -> CtrPod:
        """Run a pod and wait until libcni cached the chain's result (the ADD is complete)."""
        proc = self.spawn_pod(name, argv)
        log = self.paths.root / f"{name}.log"
        cid = self.container_id(name)
        cached = self.paths.cached_result(cid)
        deadline = time.monotonic() + timeout
        while not cached.exists():
            if proc.poll() is not None:
                raise SandboxError(
                    f"ctr run {name} exited with status {proc.returncode}:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"ctr run {name}: no CNI result after {timeout:g}s:\n{_tail(log)}"
                )
            time.sleep(0.05)
        result = _cached_result(cached)
        assert result is not None
        return CtrPod(name, cid, proc, log, cni.pod_ip(result, IFNAME))

    def delete_pod(self, pod: CtrPod, *, timeout: float = CTR_TIMEOUT) -> int:
        """Kill the task: ctr run then DELs the chain and removes the container; its exit code."""
        self.ctr("task", "kill", "-s", "SIGKILL", pod.name)
        try:
            return pod.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise SandboxError(f"ctr run {pod.name} did not end within {timeout:g}s") from e
        finally:
            _CHILDREN.pop(pod.proc.pid, None)

    def delete_network(self, name: str) -> None:
        """The DEL a runtime repeats for a container whose own DEL never happened: libcni's
        inputs exactly as ctr gives them (CNI_NETNS "", no CNI_ARGS, the cached result if the ADD
        completed), through the sandbox's libcni (ctr has no command for a DEL alone)."""
        cid = self.container_id(name)
        conflist = json.loads((self.paths.conf_dir / layout.CONFLIST_NAME).read_text())
        inv = cni.Invocation(
            container_id=cid,
            netns_path="",
            ifname=IFNAME,
            args="",
            cni_path=[str(self.paths.bin_dir), layout.CNI_BIN_DIR],
        )
        cni.delete(self.node_netns, conflist, inv, _cached_result(self.paths.cached_result(cid)))
        self.paths.cached_result(cid).unlink(missing_ok=True)


def stop_leftover(namespace: str, node_netns: str, node_paths: layout.NodePaths) -> None:
    """`down`'s part: stop a node's containerd if one was started there."""
    if containerd_paths(node_paths).root.exists():
        Containerd(namespace, node_netns, node_paths).stop()


def _cached_result(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SandboxError(f"libcni's cache {path}: {e}") from e
    result = doc.get("result") if isinstance(doc, dict) else None
    if not isinstance(result, dict):
        raise SandboxError(f"libcni's cache {path} holds no result")
    return result


def _read_process(paths: ContainerdPaths) -> ProcessRef | None:
    try:
        return ProcessRef.from_json(json.loads(paths.process_file.read_text()))
    except (OSError, ValueError):
        return None


def _processes_naming(word: str) -> list[int]:
    """Pids whose command line holds `word` as one argument (our shims name our socket)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if word.encode() in argv:
            found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _remove_empty_cgroups(namespace: str) -> None:
    """rmdir (never more) the `/<namespace>` parent runc left in each cgroup hierarchy."""
    root = Path("/sys/fs/cgroup")
    for d in [root / namespace, *root.glob(f"*/{namespace}")]:
        with contextlib.suppress(OSError):
            d.rmdir()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"
