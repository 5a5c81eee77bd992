"""`RemotePod`: how the enroller serves a pod when the data plane runs in worker processes.

It has the face of a `PodProxy` for the enroller and the admin socket (`run`, `statistics`,
`listener_addresses`, `close_listeners`, `policy_changed`) and does the work through the
`WorkerPool`: `run` has every worker serve the pod, then closes the set of listeners the
enroller bound (which proved the ports free; the workers' sets serve), and removes the pod from
the workers when cancelled. Counters are the workers' reports, summed.
"""

from __future__ import annotations

from typing import Any

import trio

from nodeagent.inpod import Netns, PodListeners
from nodeagent.snapshot import Workload
from nodeagent.workers.supervisor import PodHandle, WorkerPool


class RemotePod:
    def __init__(
        self,
        pool: WorkerPool,
        *,
        uid: str,
        key: str,
        netns: Netns,
        listeners: PodListeners,
        workload: Workload,
    ) -> None:
        self.pool = pool
        self.handle = PodHandle(uid=uid, key=key, netns=netns, workload=workload)
        self._enroller_listeners = listeners
        self._addresses: list[tuple[str, str]] = []
        self._closed = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self._addresses = await self.pool.add_pod(self.handle)
            # With tcp_migrate_req a connection already queued here moves to a worker's socket.
            self._enroller_listeners.close()
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.pool.remove_pod(self.handle.uid)

    def statistics(self) -> dict[str, Any]:
        stats = self.pool.pod_statistics(self.handle.uid)
        for direction in ("outbound", "inbound"):
            stats.setdefault(direction, {"opened": 0, "closed": 0})
        return stats

    def pool_statistics(self) -> dict[str, int]:
        return self.pool.pool_statistics(self.handle.uid)

    def listener_addresses(self) -> list[tuple[str, str]]:
        return [] if self._closed else list(self._addresses)

    def close_listeners(self) -> None:
        """The pod is being removed or the agent drains (then the agent also calls
        `WorkerPool.stop_accepting`, for every pod at once)."""
        self._closed = True
        self._enroller_listeners.close()

    def policy_changed(self) -> None:
        """Nothing to do here: each worker re-checks on its own copy of the snapshot."""
