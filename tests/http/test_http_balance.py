"""HttpProxy over a balance.Registry, in memory with trio's autojump clock: feedback into outlier
detection (ejection, readmission), retries avoiding the failed endpoint, circuit breaking (503 UO
at once, pending queue, maxRequestsPerConnection), 503 UH, consistent hashing, and a tunnel
refused by policy answered 403 `RBAC: access denied` without retry or outlier penalty."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
import trio.testing
from http_helpers import Backend, RawClient, Reply, Seen, build, memory_connector, service, workload

from nodeagent.balance import Registry
from nodeagent.http import HttpProxy, RequestLog
from nodeagent.http.errors import UpstreamDenied
from nodeagent.routing import Source
from nodeagent.snapshot import Snapshot
from nodeagent.snapshot.model import Endpoint

MESH = Source(namespace="default", labels={"app": "client"})
HOST = "app.default.svc.cluster.local"
GET = [("host", "app")]


def policy_dr(**traffic_policy: Any) -> dict[str, Any]:
    """A DestinationRule for `app` with a top-level trafficPolicy (replaces app_snapshot's)."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "app-policy"},
        "spec": {"host": "app", "trafficPolicy": traffic_policy},
    }


def snapshot_with(**traffic_policy: Any) -> Snapshot:
    return build(
        service("app"),
        workload("10.0.0.1", {"app": "app", "version": "v1"}),
        workload("10.0.0.2", {"app": "app", "version": "v2"}),
        policy_dr(**traffic_policy),
    )


class Env:
    def __init__(
        self, proxy: HttpProxy, registry: Registry, logs: list[RequestLog], nursery: trio.Nursery
    ) -> None:
        self.proxy = proxy
        self.registry = registry
        self.logs = logs
        self.nursery = nursery

    async def client(self) -> RawClient:
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(
            partial(self.proxy.serve, server, port=80, host=HOST, client_address="10.9.9.9")
        )
        return RawClient(client)

    def cluster_stats(self) -> dict[str, Any]:
        (picker,) = self.registry.pickers()
        return picker.statistics()


@asynccontextmanager
async def env(
    snapshot: Snapshot,
    backends: dict[str, Backend],
    *,
    connector: Callable[[Endpoint, int], Awaitable[trio.abc.Stream]] | None = None,
) -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        registry = Registry(now=trio.current_time, on_event=None)
        logs: list[RequestLog] = []
        proxy = HttpProxy(
            snapshot=lambda: snapshot,
            source=MESH,
            connector=connector or memory_connector(nursery, backends),
            registry=registry,
            on_request=logs.append,
        )
        yield Env(proxy, registry, logs, nursery)
        nursery.cancel_scope.cancel()


def failing(status: int, state: dict[str, bool]) -> Callable[[Seen], Awaitable[Reply]]:
    async def handler(seen: Seen) -> Reply:
        code = status if state["failing"] else 200
        return code, [], seen.backend.encode()

    return handler


async def test_consecutive_5xx_ejects_then_readmits_after_base_ejection_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bad = {"failing": True}
    backends = {"10.0.0.1": Backend("v1", failing(500, bad)), "10.0.0.2": Backend("v2")}
    snap = snapshot_with(
        loadBalancer={"simple": "ROUND_ROBIN"},
        outlierDetection={
            "consecutive5xxErrors": 3,
            "interval": "1s",
            "baseEjectionTime": "30s",
            "maxEjectionPercent": 100,
        },
    )
    async with env(snap, backends) as e:
        c = await e.client()
        codes = [(await c.request(headers=GET))[0] for _ in range(6)]
        assert codes.count(500) == 3  # round robin: every other request, until the 3rd 500
        assert len(backends["10.0.0.1"].seen) == 3
        for _ in range(20):
            assert (await c.request(headers=GET))[0] == 200
        assert len(backends["10.0.0.1"].seen) == 3, "an ejected endpoint received traffic"
        ejected = [s["endpoint"] for s in e.cluster_stats()["endpoints"] if s["ejected"]]
        assert ejected == ["10.0.0.1:8080"]
        bad["failing"] = False  # healed; readmitted at the first sweep after 30 s
        await trio.sleep(29)
        for _ in range(4):
            await c.request(headers=GET)
        assert len(backends["10.0.0.1"].seen) == 3
        await trio.sleep(3)
        for _ in range(10):
            assert (await c.request(headers=GET))[0] == 200
        assert len(backends["10.0.0.1"].seen) >= 7  # about half of 10 again


async def test_retry_avoids_the_endpoint_that_just_failed() -> None:
    backends = {
        "10.0.0.1": Backend("v1", failing(503, {"failing": True})),
        "10.0.0.2": Backend("v2"),
    }
    snap = snapshot_with(loadBalancer={"simple": "RANDOM"})
    async with env(snap, backends) as e:
        c = await e.client()
        for _ in range(40):
            status, _, body = await c.request(headers=GET)
            assert (status, body.split()[0]) == (200, b"v2")
        # A request that tried v1 first went to v2 next, never to v1 twice.
        assert all(entry.attempts <= 2 for entry in e.logs)
        assert len(backends["10.0.0.1"].seen) == sum(1 for x in e.logs if x.attempts == 2) > 0


async def test_burst_beyond_max_connections_and_pending_gets_exact_immediate_503_uo(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    async def hold(seen: Seen) -> Reply:
        await release.wait()
        return 200, [], b"held"

    backends = {"10.0.0.1": Backend("v1", hold), "10.0.0.2": Backend("v2", hold)}
    snap = snapshot_with(
        connectionPool={
            "tcp": {"maxConnections": 2, "connectTimeout": "30s"},
            "http": {"http1MaxPendingRequests": 3},
        }
    )
    results: list[tuple[int, float]] = []
    async with env(snap, backends) as e:

        async def one() -> None:
            c = await e.client()
            status, _, _ = await c.request(headers=GET)
            results.append((status, trio.current_time()))

        start = trio.current_time()
        async with trio.open_nursery() as burst:
            for _ in range(9):
                burst.start_soon(one)
            await trio.sleep(5)  # 2 in flight, 3 pending, 4 refused by now
            refused = [r for r in results if r[0] == 503]
            assert len(refused) == 4
            assert len(results) == 4
            assert all(t - start < 0.01 for _, t in refused), "UO must be immediate"
            release.set()
        assert sorted(s for s, _ in results) == [200] * 5 + [503] * 4
        uo = [x for x in e.logs if x.flags == ["UO"]]
        assert len(uo) == 4
        breaker = e.cluster_stats()["circuit_breaker"]
        assert breaker["overflow"]["pending"] == 4
        assert breaker["active"]["pending"] == 0


async def test_pending_request_gives_up_after_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    never = trio.Event()

    async def hang(seen: Seen) -> Reply:
        await never.wait()
        return 200, [], b""

    backends = {"10.0.0.1": Backend("v1", hang), "10.0.0.2": Backend("v2", hang)}
    snap = snapshot_with(
        connectionPool={
            "tcp": {"maxConnections": 1, "connectTimeout": "2s"},
            "http": {"http1MaxPendingRequests": 5},
        }
    )
    async with env(snap, backends) as e:
        first = await e.client()
        e.nursery.start_soon(partial(first.request, headers=GET))
        await trio.sleep(1)
        c = await e.client()
        t0 = trio.current_time()
        status, _, body = await c.request(headers=GET)
        assert status == 503
        assert b"overflow" in body
        assert 1.9 <= trio.current_time() - t0 <= 2.5
        assert e.logs[-1].flags[0] == "UO"


async def test_max_requests_per_connection_closes_after_n() -> None:
    backends = {"10.0.0.1": Backend("v1")}
    snap = snapshot_with(connectionPool={"http": {"maxRequestsPerConnection": 2}})
    backends["10.0.0.2"] = Backend("v2")
    async with env(snap, backends) as e:
        c = await e.client()
        for _ in range(12):
            assert (await c.request(headers=GET))[0] == 200
        assert sum(len(b.seen) for b in backends.values()) == 12
        for b in backends.values():  # 2 requests per upstream connection, never more
            assert b.connections == (len(b.seen) + 1) // 2


async def test_every_endpoint_ejected_without_panic_is_503_uh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    down = {"failing": True}
    backends = {
        "10.0.0.1": Backend("v1", failing(500, down)),
        "10.0.0.2": Backend("v2", failing(500, down)),
    }
    snap = snapshot_with(
        outlierDetection={
            "consecutive5xxErrors": 1,
            "baseEjectionTime": "30s",
            "maxEjectionPercent": 100,
            "minHealthPercent": 0,
        }
    )
    async with env(snap, backends) as e:
        c = await e.client()
        for _ in range(10):
            status, _, body = await c.request(headers=GET)
            if status == 503:
                break
        assert status == 503
        assert body == b"no healthy upstream"
        assert e.logs[-1].flags == ["UH"]
        assert sum(len(b.seen) for b in backends.values()) == 2


async def test_consistent_hash_on_header_is_sticky() -> None:
    backends = {"10.0.0.1": Backend("v1"), "10.0.0.2": Backend("v2")}
    snap = snapshot_with(loadBalancer={"consistentHash": {"httpHeaderName": "x-user"}})
    async with env(snap, backends) as e:
        c = await e.client()
        chosen: dict[str, set[bytes]] = {}
        for i in range(200):
            user = f"user-{i % 20}"
            status, _, body = await c.request(headers=[*GET, ("x-user", user)])
            assert status == 200
            chosen.setdefault(user, set()).add(body.split()[0])
        assert all(len(v) == 1 for v in chosen.values())
        assert {b for v in chosen.values() for b in v} == {b"v1", b"v2"}


async def test_tunnel_denied_by_policy_is_403_not_retried_not_an_outlier() -> None:
    calls: list[str] = []

    async def deny(endpoint: Endpoint, port: int) -> trio.abc.Stream:
        calls.append(endpoint.address)
        raise UpstreamDenied(f"tunnel to {endpoint.address}: refused: 403 denied by policy")

    snap = snapshot_with(
        outlierDetection={"consecutiveGatewayErrors": 1, "maxEjectionPercent": 100}
    )
    async with env(snap, {}, connector=deny) as e:
        c = await e.client()
        for _ in range(3):
            status, _, body = await c.request(headers=GET)
            assert (status, body) == (403, b"RBAC: access denied")
        assert len(calls) == 3  # one attempt per request: a denial is not retried
        stats = e.cluster_stats()["endpoints"]
        assert all(not s["ejected"] and s["failures"] == 0 for s in stats)


async def test_connect_failures_eject_with_consecutive_gateway_errors() -> None:
    backends = {"10.0.0.2": Backend("v2")}  # 10.0.0.1 refuses connections
    snap = snapshot_with(
        loadBalancer={"simple": "ROUND_ROBIN"},
        outlierDetection={"consecutiveGatewayErrors": 2, "maxEjectionPercent": 100},
    )
    async with trio.open_nursery() as n:
        connector = memory_connector(n, backends)
        async with env(snap, backends, connector=connector) as e:
            c = await e.client()
            for _ in range(10):
                status, _, body = await c.request(headers=GET)
                assert (status, body.split()[0]) == (200, b"v2")  # UF retried on the other endpoint
            ejected = [s["endpoint"] for s in e.cluster_stats()["endpoints"] if s["ejected"]]
            assert ejected == ["10.0.0.1:8080"]
        n.cancel_scope.cancel()
