"""`nodeagent console`: the read-only mesh console (docs/console.md).

    nodeagent console [--listen 127.0.0.1:20001] [--store URL] [--token-file PATH]

It listens on loopback unless told otherwise; listening on any other address needs
`--token-file` (a bearer token every request must carry), so an exposed console is never open.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

import trio

from nodeagent import log
from nodeagent.console.auth import TokenError, read_token
from nodeagent.console.server import ConsoleConfig, serve
from nodeagent.store import DEFAULT_URL, ENV_VAR

DEFAULT_LISTEN = "127.0.0.1:20001"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--listen {text!r}: expected IP:PORT, e.g. {DEFAULT_LISTEN}") from None
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: expected IP:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="nodeagent console", description="Serve the read-only mesh console."
    )
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="IP:PORT")
    p.add_argument("--store", default=os.environ.get(ENV_VAR, DEFAULT_URL))
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="a file holding the bearer token every request must carry "
        "(required to listen beyond loopback)",
    )
    p.add_argument(
        "--refresh", type=float, default=2.0, help="seconds between store reads and scrapes"
    )
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "console"])
    args = p.parse_args(argv)
    log.configure(args.log_level, args.log_format)
    try:
        host, port = parse_listen(args.listen)
        token = read_token(args.token_file) if args.token_file else None
        if token is None and not is_loopback(host):
            raise ValueError(
                f"--listen {args.listen}: beyond loopback the console needs --token-file"
            )
        if not 0.1 <= args.refresh <= 60:
            raise ValueError(f"--refresh {args.refresh}: expected 0.1 to 60 seconds")
    except (ValueError, TokenError) as exc:
        print(f"nodeagent console: error: {exc}", file=sys.stderr)
        return 2
    config = ConsoleConfig(
        store_url=args.store,
        host=host,
        port=port,
        token=token,
        refresh=args.refresh,
        trust_domain=args.trust_domain,
    )
    try:
        trio.run(serve, config)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        log.get_logger("console").error("console.failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0
