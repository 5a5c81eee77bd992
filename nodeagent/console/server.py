"""`nodeagent console`'s process: read the store, scrape the agents, serve the page and the API.

Every `refresh` seconds one task lists the store's `/mesh/v1/` prefix (config, workloads, the
CA's certificate records, the agents' node records, rollout status) and rebuilds the snapshot
with the agent's own builder when the revision moved; another scrapes each agent's metrics
address (from its node record) concurrently, with a timeout, and records the scrape for the
rate windows. A store or agent outage is shown in the API, never fatal. The HTTP server binds
before `started()`; it is read-only (GET/HEAD) and, when a token is given, guarded by it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from nodeagent.console.api import Agent, ConsoleState, routes
from nodeagent.console.auth import guard_all
from nodeagent.console.checks import IssuedCert
from nodeagent.console.rollouts import PREFIX as ROLLOUTS
from nodeagent.console.rollouts import read_rollouts
from nodeagent.console.traffic import parse_scrape
from nodeagent.contract import METRICS_PATH
from nodeagent.httpserver import TcpHttpServer
from nodeagent.log import get_logger
from nodeagent.rollout.sources import SourceError, addresses_of, http_get
from nodeagent.snapshot import SnapshotBuilder
from nodeagent.store import KeyValue, Store, StoreError, open_store
from nodeagent.store.codec import decode
from nodeagent.store.keys import CERTS, ROOT

log = get_logger("console")
SCRAPE_TIMEOUT = 2.0
MAX_SCRAPE = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    store_url: str
    host: str = "127.0.0.1"
    port: int = 20001
    token: str | None = None
    refresh: float = 2.0
    trust_domain: str = "cluster.local"


def certs_of(kvs: Sequence[KeyValue]) -> list[IssuedCert]:
    out = []
    for kv in kvs:
        if not kv.key.startswith(CERTS):
            continue
        try:
            doc = decode(kv)
        except StoreError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("not_after"), int | float):
            node = kv.key.removeprefix(CERTS).split("/", 1)[0]
            out.append(
                IssuedCert(node, str(doc.get("identity", "")), str(doc.get("serial", "")),
                           float(doc["not_after"]))
            )  # fmt: skip
    return out


def agents_of(kvs: Sequence[KeyValue], known: dict[str, Agent]) -> dict[str, Agent]:
    """The agents' node records → agents to scrape (keeping what is known of each)."""
    out: dict[str, Agent] = {}
    for node, metrics in addresses_of(kvs).items():
        old = known.get(node)
        out[node] = old if old is not None and old.metrics == metrics else Agent(node, metrics)
    return out


class Console:
    def __init__(self, config: ConsoleConfig, state: ConsoleState | None = None) -> None:
        self.config = config
        self.state = state or ConsoleState(refresh_seconds=config.refresh)
        self.server: TcpHttpServer | None = None
        self._revision = -1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        store = await open_store(cfg.store_url)
        try:
            self.server = TcpHttpServer(
                cfg.host, cfg.port, guard_all(routes(self.state), cfg.token), name="console"
            )
            async with trio.open_nursery() as nursery:
                await self.read_store(store)
                await nursery.start(self.server.run)
                nursery.start_soon(self._poll, store)
                log.info("console.ready", listen=f"{cfg.host}:{self.server.port}")
                task_status.started()
        finally:
            await store.aclose()

    async def _poll(self, store: Store) -> None:
        while True:
            await trio.sleep(self.config.refresh)
            await self.read_store(store)
            await self.scrape_all()

    async def read_store(self, store: Store) -> None:
        try:
            kvs, revision = await store.range(ROOT)
        except StoreError as exc:
            self.state.store_error = str(exc)
            log.warning("console.store_failed", error=str(exc))
            return
        self.state.store_error = None
        if revision == self._revision:
            return
        self._revision = revision
        self.state.snapshot = SnapshotBuilder.build(
            kvs, revision, trust_domain=self.config.trust_domain
        ).snapshot
        self.state.certs = certs_of(kvs)
        self.state.rollouts = read_rollouts(kv for kv in kvs if kv.key.startswith(ROLLOUTS))
        agents = agents_of(kvs, self.state.agents)
        self.state.traffic.forget(set(self.state.agents) - set(agents))
        self.state.agents = agents

    async def scrape_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for agent in list(self.state.agents.values()):
                nursery.start_soon(self._scrape, agent)

    async def _scrape(self, agent: Agent) -> None:
        url = f"http://{agent.metrics}{METRICS_PATH}"
        try:
            status, body = await http_get(url, within=SCRAPE_TIMEOUT, limit=MAX_SCRAPE)
            if status != 200:
                raise SourceError(f"GET {url}: HTTP {status}")
            scrape = parse_scrape(body.decode("utf-8", "replace"))
        except (SourceError, ValueError) as exc:
            agent.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return
        now = time.time()
        agent.error = None
        agent.last_scrape = now
        self.state.traffic.record(agent.node, now, scrape)


async def serve(config: ConsoleConfig) -> None:
    console = Console(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(console.run)
