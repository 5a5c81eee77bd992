"""`nodeagent ca …`: create a CA directory, run the signer, revoke certificates, show the bundle.

    nodeagent ca init   --dir D --trust-domain TD [--intermediate-key F --intermediate-chain F]
    nodeagent ca serve  --dir D --store URL [--ttl 24h] [--extra-root PEM …]
    nodeagent ca revoke --dir D --store URL (--serial HEX | --identity SPIFFE-ID)
    nodeagent ca bundle --store URL [-o json]

Errors are one line naming the problem, exit status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from nodeagent.ca import certs, files
from nodeagent.ca.signer import Signer, crl_document
from nodeagent.config.duration import DurationError, parse_duration
from nodeagent.store import DEFAULT_URL, ENV_VAR, codec, keys, open_store
from nodeagent.store.base import Store, StoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nodeagent ca", description="The mesh's certificate authority."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    store_default = os.environ.get(ENV_VAR, DEFAULT_URL)

    init = sub.add_parser("init", help="create a CA directory (new root or given intermediate)")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--trust-domain", required=True)
    init.add_argument("--intermediate-key", type=Path)
    init.add_argument("--intermediate-chain", type=Path)

    serve = sub.add_parser("serve", help="run the signer")
    serve.add_argument("--dir", type=Path, required=True)
    serve.add_argument("--store", default=store_default)
    serve.add_argument("--ttl", default="24h", help="SVID lifetime (e.g. 24h, 90m; at least 10s)")
    serve.add_argument(
        "--extra-root", type=Path, action="append", default=[], help="publish this root too"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default="json", choices=["json", "console"])

    revoke = sub.add_parser("revoke", help="revoke certificates and publish the new CRL")
    revoke.add_argument("--dir", type=Path, required=True)
    revoke.add_argument("--store", default=store_default)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", action="append", default=[], help="serial number in hex")
    which.add_argument("--identity", help="every current certificate of this SPIFFE id")

    bundle = sub.add_parser("bundle", help="show the published trust bundle and CRL")
    bundle.add_argument("--store", default=store_default)
    bundle.add_argument("-o", "--output", choices=["table", "json", "pem"], default="table")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd != "serve":
        from nodeagent import log

        log.configure("warning", "console")  # a one-shot command: only problems on stderr
    try:
        if args.cmd == "init":
            return _init(args)
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd == "revoke":
            return trio.run(_revoke, args)
        return trio.run(_bundle, args)
    except (files.CaDirError, certs.CertError, StoreError, DurationError, OSError) as exc:
        print(f"nodeagent ca {args.cmd}: {exc}", file=sys.stderr)
        return 1


def _init(args: argparse.Namespace) -> int:
    d, authority = files.init(
        args.dir,
        args.trust_domain,
        intermediate_key=args.intermediate_key,
        intermediate_chain=args.intermediate_chain,
    )
    root = authority.roots[0]
    print(f"created CA for trust domain {args.trust_domain} in {d.path}")
    print(f"  key     {d.key_file} (mode 0600)")
    print(f"  chain   {d.chain_file}")
    print(
        f"  root    {root.subject.rfc4514_string()}  serial {certs.serial_hex(root.serial_number)}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from nodeagent import log

    ttl = parse_duration(args.ttl) / 1e9
    if ttl < 10:  # short TTLs are for rotation tests; production wants hours
        raise DurationError(f"--ttl {args.ttl} is too short (at least 10s)")
    authority, td = files.load(args.dir)
    extra: list[Any] = []
    for f in args.extra_root:
        roots = certs.load_certs(f.read_bytes(), str(f))
        for r in roots:
            if not certs.is_self_signed(r):
                raise certs.CertError(f"{f}: {r.subject.rfc4514_string()} is not a root")
        extra.extend(roots)
    log.configure(args.log_level, args.log_format)
    files.load_revoked(args.dir)  # a malformed list fails now, not at the first publish

    async def serve() -> None:
        store = await open_store(args.store)
        try:
            signer = Signer(
                store,
                authority,
                td,
                ttl=ttl,
                extra_roots=extra,
                revoked=lambda: files.load_revoked(args.dir),
            )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(signer.run)
                    log.get_logger("ca").info(
                        "ca.ready", store=store.url, trust_domain=td, ttl=ttl, dir=str(args.dir)
                    )
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    trio.run(serve)
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    authority, td = files.load(args.dir)
    store = await open_store(args.store)
    try:
        serials: set[int] = set()
        for s in args.serial:
            try:
                serials.add(int(s, 16))
            except ValueError:
                raise certs.CertError(f"--serial {s!r} is not a hexadecimal number") from None
        if args.identity:
            ident = certs.parse_spiffe_id(args.identity, td)
            serials |= await _serials_of(store, ident)
            if not serials:
                print(f"no current certificate of {ident.uri} in the store", file=sys.stderr)
                return 1
        revoked = files.add_revoked(args.dir, serials)
        doc = crl_document(authority, revoked, now=time.time())
        await store.put(keys.CA_CRL, codec.encode(doc))
        for s in sorted(serials):
            print(f"revoked {certs.serial_hex(s)}")
        print(f"published CRL with {len(revoked)} revoked serial(s)")
        return 0
    finally:
        await store.aclose()


async def _serials_of(store: Store, ident: certs.SpiffeId) -> set[int]:
    kvs, _ = await store.range(keys.CERTS)
    out = set()
    for kv in kvs:
        if not kv.key.endswith("/" + ident.key):
            continue
        try:
            doc = codec.decode(kv)
            if doc.get("identity") == ident.uri and isinstance(doc.get("serial"), str):
                out.add(int(doc["serial"], 16))
        except (codec.DecodeError, AttributeError, ValueError):
            continue
    return out


async def _bundle(args: argparse.Namespace) -> int:
    store = await open_store(args.store)
    try:
        kv = await store.get(keys.CA_BUNDLE)
        crl_kv = await store.get(keys.CA_CRL)
    finally:
        await store.aclose()
    if kv is None:
        print(f"no trust bundle published at {keys.CA_BUNDLE} (is `nodeagent ca serve` running?)")
        return 1
    doc = codec.decode(kv)
    roots = [certs.load_certs(p.encode(), keys.CA_BUNDLE)[0] for p in doc.get("roots", [])]
    revoked = codec.decode(crl_kv).get("revoked", []) if crl_kv is not None else []
    if args.output == "pem":
        sys.stdout.write(certs.cert_pem(roots).decode())
        return 0
    rows = [
        {
            "subject": r.subject.rfc4514_string(),
            "serial": certs.serial_hex(r.serial_number),
            "not_after": r.not_valid_after_utc.isoformat(),
        }
        for r in roots
    ]
    if args.output == "json":
        out = {"trust_domain": doc.get("trust_domain"), "roots": rows, "revoked": revoked}
        print(json.dumps(out, indent=2))
        return 0
    print(f"trust domain {doc.get('trust_domain')}, {len(rows)} root(s), {len(revoked)} revoked")
    print(f"{'SUBJECT':<48} {'SERIAL':<42} NOT-AFTER")
    for row in rows:
        print(f"{row['subject']:<48} {row['serial']:<42} {row['not_after']}")
    return 0
