"""What the agent must implement to serve CNI calls: the `CniHandler` protocol.

The server (server.py) owns the socket, framing, timeouts and error mapping; the handler owns
enrollment. Raising `EnrollError` makes the plugin fail with that code and message; any other
exception is reported as code 999 and logged, never taking the server down.
"""

from __future__ import annotations

from typing import Any, Protocol

from nodeagent.cni.protocol import CniRequest


class CniHandler(Protocol):
    async def add(self, req: CniRequest) -> bool:
        """Enroll the pod; return only once its rules and listeners are in place.

        Returns False when the pod is deliberately not enrolled (opted out): the plugin still
        succeeds. Must be idempotent: the runtime may repeat an ADD.
        """
        ...

    async def delete(self, req: CniRequest) -> None:
        """Undo everything for the pod. Idempotent; a pod or netns already gone is success."""
        ...

    async def check(self, req: CniRequest) -> None:
        """Raise EnrollError if the pod's rules or listeners are missing."""
        ...

    async def status(self) -> None:
        """Raise EnrollError (code 50) if the agent cannot serve ADDs right now."""
        ...

    async def gc(self, valid: list[dict[str, Any]]) -> None:
        """Release every pod whose attachment is not in `valid` ({"containerID", "ifname"})."""
        ...
