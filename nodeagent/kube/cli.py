"""`nodeagent kube-sync`: mirror Kubernetes objects into the store, leader-elected.

    nodeagent kube-sync --store etcd://etcd:2379 [--kubeconfig ~/.kube/config | (in-cluster)]
        [--lease-namespace mesh-system] [--lease-name kube-sync] [--identity $POD_NAME]
        [--no-leader-elect] [--kinds Service,EndpointSlice,…]

One `Reflector` per resource type runs only while this replica holds the Lease.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

import trio

from nodeagent import log as mesh_log
from nodeagent.kube.client import KubeClient, KubeConfig, KubeError
from nodeagent.kube.leader import LeaderElector
from nodeagent.kube.mirror import Mirror
from nodeagent.kube.reflector import Reflector
from nodeagent.kube.resources import ALL, BY_KIND, ResourceType
from nodeagent.log import get_logger
from nodeagent.store import DEFAULT_URL, ENV_VAR, open_store
from nodeagent.store.base import Store, StoreError

log = get_logger("kube.sync")


class KubeSync:
    """All reflectors of one replica, sharing a client and a mirror."""

    def __init__(
        self, client: KubeClient, store: Store, kinds: tuple[ResourceType, ...] = ALL
    ) -> None:
        self.mirror = Mirror(store)
        self.reflectors = [Reflector(client, r, self.mirror) for r in kinds]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """`started()` once every kind was listed and mirrored once."""
        async with trio.open_nursery() as nursery:
            for reflector in self.reflectors:
                await nursery.start(reflector.run)
            log.info("kube.sync.synced", kinds=[r.rtype.kind for r in self.reflectors])
            task_status.started()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nodeagent kube-sync",
        description="Mirror Kubernetes Services, EndpointSlices, Pods and Istio config into the "
        "mesh store (docs/kubernetes.md).",
    )
    p.add_argument("--store", default=os.environ.get(ENV_VAR, DEFAULT_URL), help="store URL")
    p.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        help="kubeconfig file (default: in-cluster service account)",
    )
    p.add_argument("--context", default=None, help="kubeconfig context (default: current)")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "mesh-system"))
    p.add_argument("--lease-name", default="kube-sync")
    p.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname())
    p.add_argument("--no-leader-elect", action="store_true", help="run without a Lease")
    p.add_argument(
        "--kinds",
        default=",".join(r.kind for r in ALL),
        help="comma-separated kinds to mirror (default: all)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


async def _run(args: argparse.Namespace, cfg: KubeConfig, kinds: tuple[ResourceType, ...]) -> None:
    client = KubeClient(cfg)
    store = await open_store(args.store)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
            await _sync(args, client, store, kinds)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def _stop_on_sigterm(scope: trio.CancelScope) -> None:
    # A clean stop releases the Lease (LeaderElector.run), so a standby takes over at once.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("kube.sync.stopping")
            scope.cancel()
            return


async def _sync(
    args: argparse.Namespace, client: KubeClient, store: Store, kinds: tuple[ResourceType, ...]
) -> None:
    if args.no_leader_elect:
        await KubeSync(client, store, kinds).run()
        await trio.sleep_forever()
    elector = LeaderElector(
        client, namespace=args.lease_namespace, name=args.lease_name, identity=args.identity
    )

    async def lead() -> None:
        # A fresh term re-lists: another replica led (and wrote) in between.
        await KubeSync(client, store, kinds).run()
        await trio.sleep_forever()

    await elector.run(lead)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mesh_log.configure(level=args.log_level, fmt="json")
    kinds: list[ResourceType] = []
    for name in (k.strip() for k in args.kinds.split(",") if k.strip()):
        if name not in BY_KIND:
            print(
                f"kube-sync: --kinds: unknown kind {name!r} (known: {', '.join(BY_KIND)})",
                file=sys.stderr,
            )
            return 2
        kinds.append(BY_KIND[name])
    try:
        if args.kubeconfig is not None:
            cfg = KubeConfig.from_kubeconfig(args.kubeconfig, args.context)
        else:
            cfg = KubeConfig.in_cluster()
    except KubeError as exc:
        print(f"kube-sync: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_run, args, cfg, tuple(kinds))
    except KeyboardInterrupt:
        return 0
    except StoreError as exc:
        print(f"kube-sync: store {args.store}: {exc}", file=sys.stderr)
        return 1
    return 0
