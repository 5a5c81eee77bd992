"""IngressGateway on loopback with the seed canary: real listeners, trio backends, real curl."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml
from http_helpers import (
    Backend,
    build,
    curl,
    first_endpoint_registry,
    service,
    start_tcp_backend,
    tcp_connector,
    workload,
)

from nodeagent.gateway import GatewayError, IngressGateway, host_matches, servers_by_port
from nodeagent.routing import HttpRequest
from nodeagent.snapshot import Snapshot

SEED = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "seed"


def seed(name: str) -> list[dict[str, Any]]:
    if not SEED.is_dir():
        raise AssertionError(f"seed corpus missing at {SEED}")
    with (SEED / name).open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def mesh(*docs: dict[str, Any]) -> Snapshot:
    return build(
        service("my-app", port=80, target=8080),
        workload("10.0.0.1", {"app": "my-app", "version": "v1.0.0"}),
        workload("10.0.0.2", {"app": "my-app", "version": "v2.0.0"}),
        *docs,
    )


class Holder:
    """A swappable snapshot with SnapshotSync's wait_swap() shape."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self._event = trio.Event()

    def swap(self, snap: Snapshot) -> None:
        self.snap = snap
        self._event.set()
        self._event = trio.Event()

    async def wait_swap(self) -> Snapshot:
        await self._event.wait()
        return self.snap


@asynccontextmanager
async def gateway(holder: Holder, backends: dict[str, Backend]) -> AsyncIterator[IngressGateway]:
    async with trio.open_nursery() as nursery:
        ports = {addr: await start_tcp_backend(nursery, b) for addr, b in backends.items()}
        gw = IngressGateway(
            snapshot=lambda: holder.snap,
            wait_change=holder.wait_swap,
            connector=tcp_connector(ports),
            bind_host="127.0.0.1",
            port_map=lambda port: 0,
            registry=first_endpoint_registry(),
        )
        await nursery.start(gw.run)
        try:
            yield gw
        finally:
            nursery.cancel_scope.cancel()


async def test_seed_canary_through_the_gateway_splits_90_10_and_rewrites() -> None:
    holder = Holder(mesh(*seed("01-canary.yaml")))
    b = {"10.0.0.1": Backend("v1"), "10.0.0.2": Backend("v2")}
    n = 1000
    async with gateway(holder, b) as gw:
        url = f"http://127.0.0.1:{gw.listening()[80]}"
        codes = (
            await curl("-o", "/dev/null", "-w", "%{http_code}\\n", f"{url}/my-app/x[1-{n}]")
        ).split()
        assert codes == ["200"] * n
        assert await curl(f"{url}/my-app/x") in ("v1 /x", "v2 /x")
        assert await curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/elsewhere") == "404"
        stats = gw.statistics()
    v1, v2 = len(b["10.0.0.1"].seen), len(b["10.0.0.2"].seen)
    assert v1 + v2 == n + 1
    sd = math.sqrt(n * 0.9 * 0.1)
    assert abs(v1 - 0.9 * n) <= 3.29 * sd, (v1, v2)
    assert b["10.0.0.1"].seen[0].target.startswith("/x")
    assert b["10.0.0.1"].seen[0].headers["x-forwarded-for"] == "127.0.0.1"
    assert stats["pool_reuses"] > n // 2  # upstream connections are kept alive and reused


async def test_seed_ab_through_the_gateway_then_default_route() -> None:
    canary = seed("01-canary.yaml")
    gateway_doc, dr_doc = canary[0], canary[2]
    ab = seed("03-ab-user-agent.yaml")[0]
    holder = Holder(mesh(gateway_doc, dr_doc, ab))
    b = {"10.0.0.1": Backend("v1"), "10.0.0.2": Backend("v2")}
    async with gateway(holder, b) as gw:
        url = f"http://127.0.0.1:{gw.listening()[80]}/my-app"
        assert await curl("-A", "Mozilla/5.0 Chrome/120", url) == "v1 /"
        assert await curl("-A", "Mozilla/5.0 Firefox/121", url) == "v2 /"
        assert await curl("-o", "/dev/null", "-w", "%{http_code}", "-A", "curl/8", url) == "404"
        ab["spec"]["http"].append({"route": [{"destination": {"host": "my-app", "subset": "v1"}}]})
        holder.swap(mesh(gateway_doc, dr_doc, ab))
        await trio.testing.wait_all_tasks_blocked()
        assert await curl("-A", "curl/8", url) == "v1 /my-app"


async def test_listeners_follow_gateway_changes() -> None:
    canary = seed("01-canary.yaml")
    holder = Holder(mesh(*canary))
    async with gateway(holder, {"10.0.0.1": Backend("v1"), "10.0.0.2": Backend("v2")}) as gw:
        old = gw.listening()[80]
        moved = dict(canary[0])
        moved["spec"] = {
            **canary[0]["spec"],
            "servers": [
                {
                    "port": {"number": 8080, "name": "http", "protocol": "HTTP"},
                    "hosts": ["*.example.com"],
                }
            ],
        }
        holder.swap(mesh(moved, *canary[1:]))
        await trio.testing.wait_all_tasks_blocked()
        assert set(gw.listening()) == {8080}
        with pytest.raises(OSError, match=r"(?i)refused|connect"):
            await trio.open_tcp_stream("127.0.0.1", old)
        url = f"http://127.0.0.1:{gw.listening()[8080]}/my-app/"
        assert await curl("-o", "/dev/null", "-w", "%{http_code}", url) == "404"  # Host 127.0.0.1
        assert (await curl("-H", "Host: shop.example.com", url)).endswith(" /")
        holder.swap(mesh(*canary[1:]))  # no Gateway left
        await trio.testing.wait_all_tasks_blocked()
        assert gw.listening() == {}


async def test_bind_conflict_at_start_fails_fast() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        gw = IngressGateway(
            snapshot=lambda: mesh(*seed("01-canary.yaml")),
            wait_change=trio.sleep_forever,
            connector=tcp_connector({}),
            bind_host="127.0.0.1",
            port_map=lambda port: taken,
            registry=first_endpoint_registry(),
        )
        async with trio.open_nursery() as nursery:
            with pytest.raises(GatewayError, match=f"bind gateway port 80 .*:{taken}"):
                await nursery.start(gw.run)


def test_server_selection_by_labels_port_and_host() -> None:
    snap = mesh(*seed("01-canary.yaml"))
    assert list(servers_by_port(snap, {"istio": "ingressgateway"})) == [80]
    assert servers_by_port(snap, {"istio": "egressgateway"}) == {}
    assert host_matches("*", "a.b")
    assert host_matches("ns/*.example.com", "x.example.com")
    assert not host_matches("*.example.com", "example.org")
    assert host_matches("./Shop.Example.com", "shop.example.com")
    gw = IngressGateway(
        snapshot=lambda: snap,
        wait_change=trio.sleep_forever,
        connector=tcp_connector({}),
        registry=first_endpoint_registry(),
    )
    source = gw.source_for(HttpRequest.from_target("GET", "anything:80", "/", port=80))
    assert source is not None
    assert source.gateway == "default/http-gateway"
    assert gw.source_for(HttpRequest.from_target("GET", "x", "/", port=81)) is None
