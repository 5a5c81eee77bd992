"""meshctl: apply, get, delete and validate mesh configuration (kubectl-like).

    meshctl [--store URL] apply -f FILE|DIR|- [-n NS] [--vip-range CIDR]
    meshctl get KIND [NAME] [-n NS | -A] [-o yaml|json|wide]
    meshctl delete (-f FILE|DIR|- | KIND NAME...) [-n NS] [--ignore-not-found]
    meshctl validate -f FILE|DIR|- [-n NS]
    meshctl explain --from POD|gateway --to URL [-H 'Name: value']... [-X METHOD] [-o json]
    meshctl rollout status|get|pause|resume|promote|abort NAME [-n NS] [-w] [-o json]
    meshctl ab report HOST [-n NS] [--since 10m] [-o json]

The store URL comes from --store, else $MESH_STORE, else nodeagent.store.DEFAULT_URL; the VIP
range from --vip-range, else $MESH_VIP_RANGE, else 10.96.0.0/16. Every error is printed (file,
document, field path); the exit status is 0 on success, 1 on any error, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import structlog
import trio

from nodeagent import log as mesh_log
from nodeagent.authz import l7_only_fields, tcp_warning
from nodeagent.config.apply import (
    DEFAULT_VIP_RANGE,
    VIP_RANGE_ENV,
    Target,
    apply_documents,
    delete_documents,
    find,
    parse_vip_range,
)
from nodeagent.config.batch import Document, check_references, dedupe, validate_batch
from nodeagent.config.documents import load_paths
from nodeagent.config.errors import ConfigError, ConfigInvalid, LoadError
from nodeagent.config.kinds import KINDS, UnknownKind, resolve
from nodeagent.meshctl import explain, output, rollout
from nodeagent.store import DEFAULT_URL, ENV_VAR, StoreError, open_store


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=argparse.SUPPRESS, help="store URL ($MESH_STORE)")
    common.add_argument(
        "-n", "--namespace", default=argparse.SUPPRESS, help='namespace (default "default")'
    )
    common.add_argument(
        "--vip-range", default=argparse.SUPPRESS, help=f"Service VIP range ({DEFAULT_VIP_RANGE})"
    )
    parser = argparse.ArgumentParser(
        prog="meshctl", description="Manage the mesh's configuration.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    apply = sub.add_parser("apply", parents=[common], help="create or update documents")
    apply.add_argument("-f", "--filename", action="append", required=True, metavar="FILE")

    get = sub.add_parser("get", parents=[common], help="show documents")
    get.add_argument("kind", metavar="KIND")
    get.add_argument("name", nargs="?", metavar="NAME")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", choices=["yaml", "json", "wide"])

    delete = sub.add_parser("delete", parents=[common], help="delete documents")
    delete.add_argument("-f", "--filename", action="append", metavar="FILE")
    delete.add_argument("args", nargs="*", metavar="KIND NAME")
    delete.add_argument("--ignore-not-found", action="store_true")

    validate = sub.add_parser("validate", parents=[common], help="check documents offline")
    validate.add_argument("-f", "--filename", action="append", required=True, metavar="FILE")

    explain.add_parser(sub, common)
    rollout.add_parsers(sub, common)
    return parser


def _namespace(args: argparse.Namespace) -> str:
    return str(getattr(args, "namespace", None) or "default")


def _store_url(args: argparse.Namespace) -> str:
    return str(getattr(args, "store", None) or os.environ.get(ENV_VAR) or DEFAULT_URL)


def _vip_range(args: argparse.Namespace) -> ipaddress.IPv4Network:
    text = getattr(args, "vip_range", None) or os.environ.get(VIP_RANGE_ENV) or DEFAULT_VIP_RANGE
    try:
        return parse_vip_range(str(text))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _print_errors(errors: Sequence[ConfigError | str], err: TextIO) -> None:
    for e in errors:
        print(f"error: {e}", file=err)


def _print_warnings(docs: Sequence[Document], err: TextIO) -> None:
    """What is valid but will not do everything it says: today AuthorizationPolicy fields that
    need HTTP, which Istio's TCP rule drops or widens on TCP ports."""
    for doc in docs:
        if doc.kind != "AuthorizationPolicy":
            continue
        action = doc.body["spec"].get("action", "ALLOW")
        for field in l7_only_fields(doc.body["spec"]):
            print(f"warning: {doc.source}: {doc.ref}: {tcp_warning(action, field)}", file=err)


async def _apply(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    vip_range = _vip_range(args)
    raws = load_paths(args.filename)
    docs, errors = validate_batch(raws, _namespace(args))
    if errors:
        _print_errors(errors, err)
        print(f"{len(errors)} error(s); nothing was applied", file=err)
        return 1
    if not docs:
        print("error: no documents found", file=err)
        return 1
    _print_warnings(docs, err)
    store = await open_store(_store_url(args))
    try:
        result = await apply_documents(store, docs, vip_range=vip_range)
    except ConfigInvalid as exc:
        _print_errors(exc.errors, err)
        print(f"{len(exc.errors)} error(s); nothing was applied", file=err)
        return 1
    finally:
        await store.aclose()
    for outcome in result.outcomes:
        print(f"{outcome.doc.ref} {outcome.action}", file=out)
    return 0


async def _validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    raws = load_paths(args.filename)
    docs, errors = validate_batch(raws, _namespace(args))
    errors.extend(check_references(dedupe(docs), {}))
    if errors:
        _print_errors(errors, err)
        print(f"{len(errors)} error(s) in {len(raws)} document(s)", file=err)
        return 1
    _print_warnings(docs, err)
    for doc in docs:
        print(f"{doc.ref} valid", file=out)
    return 0


async def _get(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        kind = resolve(args.kind)
    except UnknownKind as exc:
        raise UsageError(str(exc)) from None
    namespace = None if args.all_namespaces else _namespace(args)
    store = await open_store(_store_url(args))
    try:
        rows = await find(store, kind, namespace, args.name)
    finally:
        await store.aclose()
    if args.name and not rows:
        where = f" in namespace {namespace}" if namespace else ""
        print(f"error: {kind.name} {args.name} not found{where}", file=err)
        return 1
    bodies = [body for _, body in rows]
    if args.output == "json":
        out.write(output.as_json(bodies, single=bool(args.name)))
    elif args.output == "yaml":
        out.write(output.as_yaml(bodies, single=bool(args.name)))
    elif not rows:
        where = f" in namespace {namespace}" if namespace else ""
        print(f"No {kind.name} found{where}.", file=err)
    else:
        out.write(
            output.table(kind, rows, all_namespaces=args.all_namespaces, wide=args.output == "wide")
        )
    return 0


def _targets_from_files(files: list[str], namespace: str) -> list[Target]:
    targets: list[Target] = []
    problems: list[str] = []
    for raw in load_paths(files):
        data: Any = raw.data
        kind_name = data.get("kind") if isinstance(data, dict) else None
        meta = data.get("metadata") if isinstance(data, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(kind_name, str) or kind_name not in KINDS:
            problems.append(f"{raw.source}: kind {kind_name} is not supported")
            continue
        if not isinstance(name, str):
            problems.append(f"{raw.source}: {kind_name}: metadata.name: Required value")
            continue
        ns = meta.get("namespace") if isinstance(meta, dict) else None
        targets.append(Target(KINDS[kind_name], str(ns or namespace), name))
    if problems:
        raise UsageError("\n".join(problems))
    return targets


async def _delete(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    namespace = _namespace(args)
    if args.filename:
        if args.args:
            raise UsageError("give either -f FILE or KIND NAME..., not both")
        targets = _targets_from_files(args.filename, namespace)
    else:
        if len(args.args) < 2:
            raise UsageError("delete needs -f FILE or KIND NAME...")
        try:
            kind = resolve(args.args[0])
        except UnknownKind as exc:
            raise UsageError(str(exc)) from None
        targets = [Target(kind, namespace, name) for name in args.args[1:]]
    store = await open_store(_store_url(args))
    try:
        deleted, _missing = await delete_documents(
            store, targets, ignore_not_found=args.ignore_not_found
        )
    except LookupError as exc:
        print(f"error: {exc}; nothing was deleted", file=err)
        return 1
    finally:
        await store.aclose()
    for ref in deleted:
        print(f"{ref} deleted", file=out)
    return 0


_COMMANDS = {
    "apply": _apply,
    "get": _get,
    "delete": _delete,
    "validate": _validate,
    "explain": explain.run,
    "rollout": rollout.run_rollout,
    "ab": rollout.run_ab,
}


def main(argv: Sequence[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if not structlog.is_configured():
        mesh_log.configure(level="warning", fmt="console")
    command = _COMMANDS[args.command]
    try:
        return trio.run(command, args, out, err)
    except UsageError as exc:
        print(f"error: {exc}", file=err)
        return 2
    except LoadError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except StoreError as exc:
        print(f"error: store {_store_url(args)}: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
