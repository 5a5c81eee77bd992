"""The `meshctl explain` subcommand: its arguments, loading the snapshot from the store, and
the exit status (`run(args, out, err)`).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, TextIO

from nodeagent.meshctl.explain.inputs import PREFIX, ExplainError, parse_headers, parse_target
from nodeagent.meshctl.explain.rendering import render
from nodeagent.meshctl.explain.resolve import explain
from nodeagent.snapshot import Snapshot, SnapshotBuilder
from nodeagent.store import DEFAULT_URL, ENV_VAR, StoreError, open_store


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `meshctl explain` on the subparsers `sub` of meshctl's parser."""
    p = sub.add_parser(
        "explain", parents=[common], help="show what the mesh would do for one request"
    )
    p.add_argument(
        "--from", dest="source", required=True, metavar="POD", help="[ns/]name, or gateway"
    )
    p.add_argument("--to", dest="url", required=True, metavar="URL", help="http://host[:port]/…")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("-X", "--request", dest="method", default="GET", metavar="METHOD")
    p.add_argument(
        "--jwt-principal",
        metavar="ISS/SUB",
        help="the request carries a verified JWT of this issuer and subject",
    )
    p.add_argument(
        "--jwt-claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a claim of that JWT (repeat a name for a list)",
    )
    p.add_argument("-o", "--output", choices=["json"], default=None)
    p.add_argument("--trust-domain", default="cluster.local")


async def load_snapshot(store_url: str, trust_domain: str = "cluster.local") -> Snapshot:
    """One snapshot of the store, built by the agent's builder."""
    store = await open_store(store_url)
    try:
        kvs, revision = await store.range(PREFIX)
    finally:
        await store.aclose()
    return SnapshotBuilder.build(kvs, revision, trust_domain=trust_domain).snapshot


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = str(getattr(args, "store", None) or os.environ.get(ENV_VAR) or DEFAULT_URL)
    namespace = str(getattr(args, "namespace", None) or "default")
    try:
        parse_target(args.url)  # bad input fails before the store is touched
        parse_headers(args.header)
        snap = await load_snapshot(url, args.trust_domain)
        report = explain(
            snap,
            source=args.source,
            url=args.url,
            headers=args.header,
            method=args.method,
            namespace=namespace,
            jwt_principal=args.jwt_principal,
            jwt_claims=args.jwt_claim,
        )
    except ExplainError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except StoreError as exc:
        print(f"error: store {url}: {exc}", file=err)
        return 1
    if args.output == "json":
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(render(report))
    return 0
