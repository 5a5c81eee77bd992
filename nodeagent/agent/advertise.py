"""The node's record in the store, `/mesh/v1/nodes/<node>`: where its agent's metrics port
(15020) is reachable, so the console finds every agent through the store.

Written under the node's lease (it vanishes when the agent dies) and again whenever the lease
changes; a store error is retried at the next tick, never fatal. The value is a msgpack map
`{"v": 1, "node": …, "metrics": "host:port"}` (docs/store.md).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from nodeagent.log import get_logger
from nodeagent.store import Store, StoreError
from nodeagent.store.codec import encode
from nodeagent.store.keys import node as node_key

log = get_logger("agent.advertise")
DOC_VERSION = 1
CHECK_INTERVAL = 2.0


def node_record(node: str, host: str, port: int) -> dict[str, object]:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {"v": DOC_VERSION, "node": node, "metrics": address}


async def advertise(
    store: Store, node: str, host: str, port: int, lease: Callable[[], int]
) -> None:
    """Keep the node record present under the current lease (runs until cancelled)."""
    value = encode(node_record(node, host, port))
    written = 0
    while True:
        current = lease()
        if current and current != written:
            try:
                await store.put(node_key(node), value, lease=current)
                written = current
                log.info("agent.advertised", node=node, metrics=f"{host}:{port}")
            except StoreError as exc:
                log.warning("agent.advertise_failed", node=node, error=str(exc))
        await trio.sleep(CHECK_INTERVAL)
