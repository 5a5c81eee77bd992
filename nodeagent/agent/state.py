"""What the agent has enrolled, persisted so a restarted agent can re-adopt every pod.

One msgpack file in the run dir, written atomically (tmp + rename) after every change; a failed
write leaves the previous file as it was and no temporary file. Records are
plain data: enough to reopen the pod's netns, verify it is the same namespace, and rebuild its
rules, listeners and registration.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

STATE_VERSION = 1


class StateError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class PodRecord:
    uid: str
    namespace: str
    name: str
    container_id: str
    netns: str
    netns_id: tuple[int, int]  # (st_dev, st_ino): a re-created path is another pod
    addresses: tuple[str, ...]
    service_account: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["netns_id"] = list(self.netns_id)
        d["addresses"] = list(self.addresses)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PodRecord:
        try:
            return cls(
                uid=str(d["uid"]),
                namespace=str(d["namespace"]),
                name=str(d["name"]),
                container_id=str(d["container_id"]),
                netns=str(d["netns"]),
                netns_id=(int(d["netns_id"][0]), int(d["netns_id"][1])),
                addresses=tuple(str(a) for a in d["addresses"]),
                service_account=str(d["service_account"]),
                labels={str(k): str(v) for k, v in d.get("labels", {}).items()},
                annotations={str(k): str(v) for k, v in d.get("annotations", {}).items()},
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StateError(f"malformed pod record {d!r}: {exc}") from None


@dataclass(slots=True)
class AgentState:
    path: Path
    pods: dict[str, PodRecord] = field(default_factory=dict)  # by uid
    lease: int = 0

    @classmethod
    def load(cls, path: Path) -> AgentState:
        if not path.exists():
            return cls(path)
        try:
            raw = msgpack.unpackb(path.read_bytes(), raw=False)
            if raw.get("v") != STATE_VERSION:
                raise StateError(f"state version {raw.get('v')!r}, expected {STATE_VERSION}")
            pods = [PodRecord.from_wire(p) for p in raw["pods"]]
            return cls(path, {p.uid: p for p in pods}, int(raw.get("lease", 0)))
        except StateError as exc:
            raise StateError(f"{path}: {exc}") from None
        except Exception as exc:
            raise StateError(f"{path}: unreadable agent state: {exc}") from None

    def save(self) -> None:
        data = {
            "v": STATE_VERSION,
            "lease": self.lease,
            "pods": [p.to_wire() for p in self.pods.values()],
        }
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(msgpack.packb(data, use_bin_type=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            # The previous file is intact; leave no half-written copy beside it.
            tmp.unlink(missing_ok=True)
            raise
