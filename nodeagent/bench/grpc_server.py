"""The bench's gRPC server (grpcio, a dev dependency: the bench is tooling, not in the runtime
wheel): `bench.Echo/Unary` answers its request message, on `--port`; `--probe HOST:PORT` makes
one real call and fails unless the message comes back. Generic handlers, raw
bytes: no proto to compile. `request_file(path)` writes one framed gRPC request (the 5-byte
prefix + a 64-byte message) for h2load's `-d`."""

from __future__ import annotations

import argparse
from concurrent import futures
from pathlib import Path
from typing import Any

METHOD = "/bench.Echo/Unary"
MESSAGE = b"x" * 64


def request_file(path: Path) -> Path:
    path.write_bytes(b"\x00" + len(MESSAGE).to_bytes(4, "big") + MESSAGE)
    return path


def main() -> None:
    import grpc  # a dev dependency: imported only where the server runs

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--probe", default="", metavar="HOST:PORT", help="one call, then exit")
    args = parser.parse_args()

    def ident(b: bytes) -> bytes:
        return b

    if args.probe:
        channel = grpc.insecure_channel(args.probe, options=[("grpc.enable_http_proxy", 0)])
        call = channel.unary_unary(METHOD, request_serializer=ident, response_deserializer=ident)
        answer = call(MESSAGE, timeout=10)
        if answer != MESSAGE:
            raise SystemExit(f"gRPC probe {args.probe}: answered {answer!r}")
        return

    def unary(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
