"""The sandbox's fixed layout, as pure functions: names, addresses, CNI config and CNI_ARGS.

Nothing here touches the system, so every naming and addressing rule is unit-tested without
root. The address plan:

| what | where |
| --- | --- |
| underlay | 10.200.0.0/24 on a bridge in `<name>-ul` |
| etcd (with `--store etcd`) | 10.200.0.2:2379 in `<name>-etcd` |
| node i | 10.200.0.(10+i) in `<name>-ni` |
| outside host | 10.200.0.100 in `<name>-out` |
| pods of node i | 10.201.i.0/24, gateway 10.201.i.1 on the node's CNI bridge |
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.contract import ADMIN_SOCKET_NAME, CNI_SOCKET_NAME
from nodeagent.sandbox.errors import SandboxError

STATE_ROOT = Path("/run/nodeagent-sandbox")
DEFAULT_NAME = "mesh"
CNI_BIN_DIR = "/usr/lib/cni"
CNI_VERSION = "1.0.0"
NETWORK_NAME = "mesh"
CONFLIST_NAME = "10-mesh.conflist"
MESH_CNI_TYPE = "mesh-cni"
NODE_BRIDGE = "cni0"
UNDERLAY_BRIDGE = "br0"
UNDERLAY_PREFIX = "10.200.0"
UNDERLAY_PREFIXLEN = 24
ETCD_IP = f"{UNDERLAY_PREFIX}.2"
ETCD_CLIENT_PORT = 2379
OUTSIDE_IP = f"{UNDERLAY_PREFIX}.100"
# The mesh console (`nodeagent console`) in a control-plane namespace of its own.
CONSOLE_IP = f"{UNDERLAY_PREFIX}.3"
CONSOLE_PORT = 20001
MAX_NODES = 50
# Long enough to stay readable, short enough for any tool that prints it in a column.
MAX_NETNS_LEN = 64
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"

# No '-': then `<name>-…` can never be another sandbox's namespace (see `is_own_netns`).
_SANDBOX_NAME = re.compile(r"^[a-z][a-z0-9]{0,19}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NODE = re.compile(r"^n([1-9][0-9]*)$")


def check_sandbox_name(name: str) -> str:
    if not _SANDBOX_NAME.match(name):
        raise SandboxError(
            f"invalid sandbox name {name!r}: use 1-20 of [a-z0-9], starting with a letter"
        )
    return name


def check_namespace(namespace: str) -> str:
    if not _DNS_LABEL.match(namespace):
        raise SandboxError(f"invalid namespace {namespace!r}: must be a DNS label ([a-z0-9-])")
    return namespace


def check_object_name(kind: str, name: str) -> str:
    if not _DNS_SUBDOMAIN.match(name):
        raise SandboxError(f"invalid {kind} name {name!r}: must be a DNS subdomain ([a-z0-9-.])")
    return name


def node_index(node: str) -> int:
    """`n3` → 3."""
    m = _NODE.match(node)
    if not m:
        raise SandboxError(f"invalid node name {node!r}: nodes are named n1, n2, …")
    return int(m.group(1))


def node_name(index: int) -> str:
    return f"n{index}"


def check_node_count(nodes: int) -> int:
    if not 1 <= nodes <= MAX_NODES:
        raise SandboxError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    return nodes


def underlay_netns(sandbox: str) -> str:
    return f"{sandbox}-ul"


def outside_netns(sandbox: str) -> str:
    return f"{sandbox}-out"


def etcd_netns(sandbox: str) -> str:
    return f"{sandbox}-etcd"


def console_netns(sandbox: str) -> str:
    return f"{sandbox}-cp"


def node_netns(sandbox: str, node: str) -> str:
    return f"{sandbox}-{node}"


def node_underlay_ip(index: int) -> str:
    return f"{UNDERLAY_PREFIX}.{10 + index}"


def pod_cidr(index: int) -> str:
    return f"10.201.{index}.0/24"


def pod_gateway(index: int) -> str:
    return f"10.201.{index}.1"


def pod_netns(sandbox: str, node: str, namespace: str, pod: str) -> str:
    """`<sandbox>-<node>-<ns>-<pod>`, cut and suffixed with a hash when too long.

    The hash keeps distinct pods distinct after cutting; the kept prefix keeps the name readable
    and still starting with `<sandbox>-<node>-`, which `down` relies on when the state is lost.
    """
    full = f"{sandbox}-{node}-{namespace}-{pod}"
    if len(full) <= MAX_NETNS_LEN:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    return f"{full[: MAX_NETNS_LEN - 11].rstrip('-.')}-{digest}"


def is_own_netns(sandbox: str, netns: str) -> bool:
    """Whether `netns` has one of the names this sandbox gives (used when its state is lost)."""
    own = (underlay_netns(sandbox), outside_netns(sandbox), etcd_netns(sandbox))
    if netns in (*own, console_netns(sandbox)):
        return True
    rest = netns.removeprefix(f"{sandbox}-")
    if rest == netns:
        return False
    return re.match(r"^n[1-9][0-9]*(-.+)?$", rest) is not None


def store_url(kind: str, state_dir: Path) -> str:
    if kind == "sqlite":
        return f"sqlite://{state_dir / 'mesh.db'}"
    if kind == "etcd":
        return f"etcd://{ETCD_IP}:{ETCD_CLIENT_PORT}"
    raise SandboxError(f"unknown store {kind!r}: use sqlite or etcd")


@dataclass(frozen=True, slots=True)
class NodePaths:
    """Where a node's files live under the sandbox's state dir."""

    root: Path

    @property
    def run_dir(self) -> Path:
        return self.root

    @property
    def cni_socket(self) -> Path:
        return self.root / CNI_SOCKET_NAME

    @property
    def admin_socket(self) -> Path:
        return self.root / ADMIN_SOCKET_NAME

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def conflist(self) -> Path:
        return self.root / "net.d" / CONFLIST_NAME

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"


def node_paths(state_dir: Path, node: str) -> NodePaths:
    return NodePaths(state_dir / node)


def conflist(index: int, paths: NodePaths, *, mesh_cni: bool = True) -> dict[str, Any]:
    """The node's CNI network list: loopback, bridge with host-local IPAM, then mesh-cni."""
    plugins: list[dict[str, Any]] = [
        {"type": "loopback"},
        {
            "type": "bridge",
            "bridge": NODE_BRIDGE,
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": pod_cidr(index), "gateway": pod_gateway(index)}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                # Ours, under the state dir, so `down` removes every allocation with it.
                "dataDir": str(paths.ipam_dir),
            },
        },
    ]
    if mesh_cni:
        plugins.append({"type": MESH_CNI_TYPE, "agentSocket": str(paths.cni_socket)})
    return {"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "plugins": plugins}


def encode_pod_meta(
    labels: Mapping[str, str], annotations: Mapping[str, str], service_account: str
) -> str:
    """MESH_POD_META: base64url of the JSON, WITHOUT padding.

    CNI_ARGS is `K=V;K=V`, and the Go plugins (host-local) reject a pair holding a second `=`,
    so padding would break the whole chain. Decoders add the padding back.
    """
    doc = {
        "labels": dict(labels),
        "annotations": dict(annotations),
        "serviceAccount": service_account,
    }
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_pod_meta(value: str) -> dict[str, Any]:
    """The inverse of `encode_pod_meta` (for tests and tools)."""
    padded = value + "=" * (-len(value) % 4)
    doc = json.loads(base64.urlsafe_b64decode(padded))
    if not isinstance(doc, dict):
        raise SandboxError("MESH_POD_META is not a JSON object")
    return doc


def cni_args(
    *,
    namespace: str,
    pod: str,
    container_id: str,
    uid: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    service_account: str,
) -> str:
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", pod),
        ("K8S_POD_INFRA_CONTAINER_ID", container_id),
        ("K8S_POD_UID", uid),
        ("MESH_POD_META", encode_pod_meta(labels, annotations, service_account)),
    ]
    return ";".join(f"{k}={v}" for k, v in pairs)


def parse_kv_list(flag: str, text: str | None) -> dict[str, str]:
    """`k=v,k2=v2` (as given to --labels / --annotations) → dict; empty or None → {}."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SandboxError(f"{flag}: {item!r} is not key=value")
        out[key] = value
    return out
