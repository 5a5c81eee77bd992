"""The agent's node record: written under its lease, again under a new lease, gone with it."""

from __future__ import annotations

import trio

from nodeagent.agent.advertise import advertise, node_record
from nodeagent.store import open_store
from nodeagent.store.codec import decode
from nodeagent.store.keys import node as node_key


async def test_the_node_record_follows_the_lease(autojump_clock: object) -> None:
    store = await open_store("memory://advertise")
    try:
        first = await store.grant_lease(10)
        lease = [first]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(advertise, store, "n1", "10.200.0.11", 15020, lambda: lease[0])
            await trio.sleep(0.1)
            kv = await store.get(node_key("n1"))
            assert kv is not None
            assert kv.lease == first
            assert decode(kv) == {"v": 1, "node": "n1", "metrics": "10.200.0.11:15020"}
            await store.revoke_lease(first)  # the agent's lease expired: the record went with it
            assert await store.get(node_key("n1")) is None
            lease[0] = await store.grant_lease(10)  # hold_lease got a new one
            await trio.sleep(5)
            kv = await store.get(node_key("n1"))
            assert kv is not None
            assert kv.lease == lease[0]
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def test_an_ipv6_address_is_bracketed() -> None:
    assert node_record("n1", "fd00::1", 15020)["metrics"] == "[fd00::1]:15020"
