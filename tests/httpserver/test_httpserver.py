"""The unix-socket HTTP server on a real socket, spoken to by curl and by raw bytes."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path
from typing import Any

import trio

from nodeagent.httpserver import Response, UnixSocketHttpServer


def _routes() -> dict[str, Any]:
    def hello(query: Any) -> Response:
        return Response.json({"hello": query.get("name", ["world"])[0]})

    def boom(_: Any) -> Response:
        raise RuntimeError("kaput")

    def bad(_: Any) -> Response:
        raise ValueError("level must be one of debug, info")

    return {"/hello": hello, "/boom": boom, "/bad": bad}


async def _curl(sock: Path, path: str) -> tuple[int, str]:
    proc = await trio.run_process(
        ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(sock), f"http://agent{path}"],
        capture_stdout=True,
        check=False,
    )
    body, _, code = proc.stdout.decode().rpartition("\n")
    return int(code), body


async def test_serves_routes_over_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(UnixSocketHttpServer(sock, _routes()).run)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        code, body = await _curl(sock, "/hello?name=mesh")
        assert (code, json.loads(body)) == (200, {"hello": "mesh"})
        code, body = await _curl(sock, "/nope")
        assert code == 404
        assert "/hello" in json.loads(body)["endpoints"]
        code, body = await _curl(sock, "/boom")
        assert code == 500
        assert "kaput" in body
        code, _ = await _curl(sock, "/bad")
        assert code == 400
        nursery.cancel_scope.cancel()
    assert not sock.exists()


async def test_a_successors_socket_at_the_path_is_left_alone_on_the_way_out(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "admin.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(UnixSocketHttpServer(sock, _routes()).run)
        # A successor binds the path while this server is still finishing (a handover).
        sock.unlink()
        successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        successor.bind(str(sock))
        nursery.cancel_scope.cancel()
    try:
        assert sock.is_socket()  # not unlinked: it is not ours any more
    finally:
        successor.close()


async def test_malformed_request_gets_400_and_server_survives(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(UnixSocketHttpServer(sock, _routes()).run)
        stream = await trio.open_unix_socket(str(sock))
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        reply = await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 400")
        await stream.aclose()
        code, _ = await _curl(sock, "/hello")
        assert code == 200
        nursery.cancel_scope.cancel()
