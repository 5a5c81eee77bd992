"""`nodeagent controller`: run the rollout controller (leader-elected through a store lease).

    nodeagent controller [--store URL] [--prometheus-url URL] [--identity ID] [--lease-ttl S]

Metrics come from every agent's 15020 endpoint (the agents announce it in the store), or from
a Prometheus when `--prometheus-url` (or $MESH_PROMETHEUS_URL) is given.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import trio

from nodeagent.rollout.controller import TICK, Controller
from nodeagent.rollout.leader import StoreElection
from nodeagent.rollout.sources import AgentScraper, PrometheusSource, Source
from nodeagent.store import DEFAULT_URL, ENV_VAR, StoreError, open_store

LEADER_NAME = "rollout-controller"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodeagent controller", description=__doc__.split("\n")[0])
    p.add_argument("--store", default=os.environ.get(ENV_VAR, DEFAULT_URL))
    p.add_argument("--prometheus-url", default=os.environ.get("MESH_PROMETHEUS_URL", ""))
    p.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the leader key (a restart with the same name takes over "
        "its own key at once)",
    )
    p.add_argument("--lease-ttl", type=float, default=10.0, help="leader lease, seconds")
    p.add_argument("--tick", type=float, default=TICK, help="seconds between reconciliations")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "console"])
    return p


def main(argv: list[str]) -> int:
    from nodeagent import log

    args = _parser().parse_args(argv)
    if not 1.0 <= args.lease_ttl <= 600:
        print("nodeagent controller: --lease-ttl must be between 1 and 600", file=sys.stderr)
        return 2
    log.configure(args.log_level, args.log_format)

    async def serve() -> None:
        store = await open_store(args.store)
        try:
            source: Source = (
                PrometheusSource(args.prometheus_url)
                if args.prometheus_url
                else AgentScraper(store)
            )
            election = StoreElection(
                store, name=LEADER_NAME, identity=args.identity, ttl=args.lease_ttl
            )
            controller = Controller(store, source, tick=args.tick, fence=lambda: election.fence)
            log.get_logger("rollout").info(
                "controller.started",
                store=store.url,
                identity=args.identity,
                metrics=args.prometheus_url or "agents",
            )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(election.run, controller.run)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    try:
        trio.run(serve)
    except StoreError as exc:
        print(f"nodeagent controller: store {args.store}: {exc}", file=sys.stderr)
        return 1
    return 0
