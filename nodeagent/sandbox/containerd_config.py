"""containerd's files for one sandbox node, as pure functions: where everything lives under
`<state>/<node>/containerd/`, its config, the bind mounts of its private mount namespace, and the
CNI chain it gets (the node's own, with mesh-cni's `unnamedPods`). nodeagent/sandbox/containerd.py
runs it."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.sandbox import cni, layout

# The Kubernetes namespace mesh-cni gives the pods it names (`unnamedPods`).
POD_NAMESPACE = "default"
IFNAME = "eth0"  # go-cni's default: prefix "eth" + the network's index


@dataclass(frozen=True, slots=True)
class ContainerdPaths:
    """Where one node's containerd keeps everything: `<state>/<node>/containerd/`."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.root / "containerd.log"

    @property
    def process_file(self) -> Path:
        return self.root / "containerd.json"

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def cni_cache(self) -> Path:
        return self.root / "cni"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def mesh_cni_log(self) -> Path:
        return self.root / "mesh-cni.log"

    def binds(self) -> list[tuple[Path, str]]:
        """(our directory, the fixed path it is bound on), in mount order."""
        return [
            (self.conf_dir, "/etc/cni/net.d"),
            (self.bin_dir, "/opt/cni/bin"),
            (self.cni_cache, "/var/lib/cni"),
            (self.run_dir, "/run/containerd"),
        ]

    def cached_result(self, container_id: str) -> Path:
        """libcni's cache file for an attachment (`<net>-<container id>-<ifname>`)."""
        return self.cni_cache / "results" / f"{layout.NETWORK_NAME}-{container_id}-{IFNAME}"


def containerd_paths(node_paths: layout.NodePaths) -> ContainerdPaths:
    return ContainerdPaths(node_paths.root / "containerd")


def config_toml(paths: ContainerdPaths) -> str:
    """containerd's config: its own root, state and sockets; no CRI (ctr calls CNI itself)."""
    return "\n".join(
        [
            "version = 2",
            f"root = {json.dumps(str(paths.root / 'root'))}",
            f"state = {json.dumps(str(paths.root / 'state'))}",
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f"  address = {json.dumps(str(paths.socket))}",
            "[ttrpc]",
            f"  address = {json.dumps(str(paths.socket) + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {json.dumps(str(paths.root / 'opt'))}",
            "",
        ]
    )


def launch_script(paths: ContainerdPaths) -> str:
    """Run by `unshare --mount`: the bind mounts, then containerd in place of the shell."""
    lines = ["set -e"]
    for source, target in paths.binds():
        lines.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
    lines.append(f"exec containerd --config {shlex.quote(str(paths.config))}")
    return "\n".join(lines)


def node_conflist(sandbox_chain: dict[str, Any], paths: ContainerdPaths) -> dict[str, Any]:
    """The node's own chain (same bridge, same host-local pool: one node, one address pool),
    with mesh-cni, when it is there, told to enroll the pods ctr does not name (`unnamedPods`)
    and to log its calls."""
    doc: dict[str, Any] = json.loads(json.dumps(sandbox_chain))
    for plugin in cni.check_netconf(doc, "the node's CNI network list"):
        if plugin["type"] == layout.MESH_CNI_TYPE:
            plugin["unnamedPods"] = {"namespace": POD_NAMESPACE}
            plugin["logFile"] = str(paths.mesh_cni_log)
    return doc
