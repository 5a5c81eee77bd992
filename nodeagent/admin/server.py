"""A small HTTP/1.1 server on a unix socket for operators and tools (`curl --unix-socket`).

Handlers are plain functions `(query) -> Response`; the server owns parsing (h11, bounded), one
request per connection turn, and error mapping. Nothing here knows what the agent is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from nodeagent.log import get_logger

log = get_logger("admin")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    @classmethod
    def text(cls, value: str, status: int = 200) -> Response:
        return cls(status, value.encode(), "text/plain; charset=utf-8")


Handler = Callable[[Mapping[str, list[str]]], Response]


class AdminServer:
    def __init__(self, socket_path: Path, routes: Mapping[str, Handler]) -> None:
        self.socket_path = socket_path
        self.routes = dict(routes)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.is_socket():
            self.socket_path.unlink()
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                await sock.bind(str(self.socket_path))
            finally:
                os.umask(old)
            os.chmod(self.socket_path, 0o600)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise OSError(f"bind admin socket {self.socket_path}: {exc.strerror}") from exc
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._serve, [listener])
        finally:
            self.socket_path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await self._one_connection(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    async def _one_connection(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        while True:
            event = await self._next_event(stream, conn)
            if not isinstance(event, h11.Request):
                return
            while not isinstance(await self._next_event(stream, conn), h11.EndOfMessage):
                pass
            response = self._dispatch(event)
            headers = [
                ("content-type", response.content_type),
                ("content-length", str(len(response.body))),
            ]
            await stream.send_all(
                conn.send(h11.Response(status_code=response.status, headers=headers))
            )
            await stream.send_all(conn.send(h11.Data(data=response.body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _next_event(self, stream: trio.SocketStream, conn: h11.Connection) -> Any:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                body = f"bad request: {exc}\n".encode()
                await stream.send_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
                return None
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(MAX_REQUEST))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            return event

    def _dispatch(self, request: h11.Request) -> Response:
        url = urlsplit(request.target.decode("ascii", "replace"))
        handler = self.routes.get(url.path)
        if handler is None:
            return Response.json(
                {"error": f"no such endpoint {url.path}", "endpoints": sorted(self.routes)}, 404
            )
        try:
            return handler(parse_qs(url.query))
        except ValueError as exc:
            return Response.json({"error": str(exc)}, 400)
        except Exception as exc:
            log.exception("admin.handler_failed", path=url.path)
            return Response.json({"error": f"{type(exc).__name__}: {exc}"}, 500)
