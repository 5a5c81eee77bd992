"""The sandbox's record of what it created: `<state dir>/state.json`, read and written under a lock.

Every step of `up` and `pod add` is recorded BEFORE it is taken (a namespace is listed before it
is created), so `down` can undo a partial run. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.sandbox.errors import SandboxError
from nodeagent.sandbox.system import ProcessRef

STATE_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = ".lock"


@dataclass(slots=True)
class NodeState:
    name: str
    index: int
    netns: str
    underlay_ip: str
    pod_cidr: str
    gateway: str
    run_dir: str
    agent: ProcessRef | None = None
    # Extra `nodeagent run` arguments (`--drain-timeout 2`…), kept for restarts.
    agent_args: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PodState:
    namespace: str
    name: str
    node: str
    netns: str
    uid: str
    container_id: str
    cni_args: str
    log: str
    ip: str | None = None
    cmd: list[str] = field(default_factory=list)
    process: ProcessRef | None = None
    # The network list and the final ADD result, cached (as libcni does) for DEL.
    netconf: dict[str, Any] | None = None
    result: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(slots=True)
class State:
    name: str
    state_dir: str
    store: str
    store_url: str
    cni_path: list[str]
    agents: bool
    agent_cmd: list[str]
    mesh_cni: bool
    outside_ip: str
    version: int = STATE_VERSION
    # Namespaces in creation order; `down` deletes them in reverse.
    netns: list[str] = field(default_factory=list)
    nodes: dict[str, NodeState] = field(default_factory=dict)
    pods: dict[str, PodState] = field(default_factory=dict)
    etcd: ProcessRef | None = None
    etcd_url: str | None = None
    # The CA's signer (`nodeagent ca serve`), run in node n1's namespace; its dir is <state>/ca.
    ca: ProcessRef | None = None
    # The node whose agent also serves the ingress gateway (`nodeagent run --gateway`), if any.
    gateway: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(doc: Any, where: str) -> State:
        try:
            if doc.get("version") != STATE_VERSION:
                raise SandboxError(
                    f"{where}: state version {doc.get('version')!r}, expected {STATE_VERSION}"
                )
            nodes = {
                k: NodeState(**{**v, "agent": ProcessRef.from_json(v.get("agent"))})
                for k, v in doc["nodes"].items()
            }
            pods = {
                k: PodState(**{**v, "process": ProcessRef.from_json(v.get("process"))})
                for k, v in doc["pods"].items()
            }
            rest = {k: v for k, v in doc.items() if k not in ("nodes", "pods", "etcd", "ca")}
            return State(
                **rest,
                nodes=nodes,
                pods=pods,
                etcd=ProcessRef.from_json(doc.get("etcd")),
                ca=ProcessRef.from_json(doc.get("ca")),
            )
        except (AttributeError, KeyError, TypeError) as e:
            raise SandboxError(f"{where}: malformed sandbox state ({e})") from e


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def load(state_dir: Path) -> State:
    path = state_path(state_dir)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SandboxError(f"no sandbox state at {path} (is the sandbox up?)") from e
    except ValueError as e:
        raise SandboxError(f"{path}: not JSON ({e})") from e
    return State.from_json(doc, str(path))


def save(state: State) -> None:
    path = state_path(Path(state.state_dir))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Serialize state changes between CLI invocations and API users of one sandbox."""
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError as e:
        raise SandboxError(f"no sandbox state dir {state_dir} (is the sandbox up?)") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
