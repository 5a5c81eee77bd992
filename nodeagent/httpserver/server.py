"""A small HTTP/1.1 server for operators and tools, on a unix socket or a TCP port.

Handlers are plain functions; the server owns parsing (h11, bounded), one request per connection
turn, method checks and error mapping. `UnixSocketHttpServer` listens on a unix socket (mode 0600,
for `curl --unix-socket`: the admin socket); `TcpHttpServer` on a TCP port (the node's 15020
metrics endpoint). Nothing here knows what the agent is.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from nodeagent.log import get_logger

log = get_logger("httpserver")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    @classmethod
    def text(cls, value: str, status: int = 200, content_type: str | None = None) -> Response:
        return cls(status, value.encode(), content_type or "text/plain; charset=utf-8")


@dataclass(frozen=True, slots=True)
class HttpServerRequest:
    method: str
    path: str
    query: Mapping[str, list[str]]
    body: bytes = b""
    # Lower-case names; a repeated header's values joined with ", " (RFC 9110).
    headers: Mapping[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


Handler = Callable[[Mapping[str, list[str]]], Response]
"""A handler of any method that only needs the query string."""


@dataclass(frozen=True, slots=True)
class Route:
    """A handler that sees the whole request and accepts only `methods` (405 otherwise)."""

    handler: Callable[[HttpServerRequest], Response]
    methods: frozenset[str] = frozenset({"GET", "HEAD"})


Routes = Mapping[str, Handler | Route]


class HttpServer:
    """The routes and the per-connection loop, independent of the listener."""

    def __init__(self, routes: Routes, *, name: str = "admin") -> None:
        self.routes: dict[str, Handler | Route] = dict(routes)
        self.name = name

    async def _serve_listeners(self, listeners: Sequence[trio.abc.Listener[Any]]) -> None:
        await trio.serve_listeners(self._serve, list(listeners))

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            await self._one_connection(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    async def _one_connection(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        """Requests one after another on a keep-alive connection. Each request (its head and
        body) must arrive within REQUEST_TIMEOUT of the previous answer, and each answer must be
        taken within REQUEST_TIMEOUT; a client that polls for longer keeps its connection (a
        bound on the whole connection would cut an answer mid-body)."""
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT):
                request = await self._read_request(stream, conn)
            if request is None:
                return
            event, body = request
            if len(body) > MAX_REQUEST:
                response = Response.text("body too large\n", 413)
            else:
                response = self.dispatch(
                    event.method.decode("ascii", "replace"), event.target, body, event.headers
                )
            with trio.move_on_after(REQUEST_TIMEOUT):
                await self._send(stream, conn, event, response)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection
    ) -> tuple[h11.Request, bytes] | None:
        """The next request and its body (cut short past MAX_REQUEST); None on a close."""
        event = await self._next_event(stream, conn)
        if not isinstance(event, h11.Request):
            return None
        body = bytearray()
        while True:
            part = await self._next_event(stream, conn)
            if part is None:
                return None
            if isinstance(part, h11.EndOfMessage):
                return event, bytes(body)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_REQUEST:
                    return event, bytes(body)

    @staticmethod
    async def _send(
        stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request, response: Response
    ) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
        if request.method != b"HEAD":
            await stream.send_all(conn.send(h11.Data(data=response.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _next_event(self, stream: trio.abc.Stream, conn: h11.Connection) -> Any:
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
                conn.receive_data(bytes(await stream.receive_some(MAX_REQUEST)))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            return event

    def dispatch(
        self,
        method: str,
        target: bytes,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> Response:
        """The response for one request (sync: handlers never block)."""
        url = urlsplit(target.decode("ascii", "replace"))
        route = self.routes.get(url.path)
        if route is None:
            return Response.json(
                {"error": f"no such endpoint {url.path}", "endpoints": sorted(self.routes)}, 404
            )
        try:
            query = parse_qs(url.query)
            if isinstance(route, Route):
                if method not in route.methods:
                    allowed = ", ".join(sorted(route.methods))
                    return Response(
                        405,
                        json.dumps(
                            {"error": f"{url.path} accepts {allowed}, not {method}"}
                        ).encode()
                        + b"\n",
                        headers=(("allow", allowed),),
                    )
                joined: dict[str, str] = {}
                for name, value in headers:
                    key = name.decode("ascii", "replace").lower()
                    text = value.decode("latin-1")
                    joined[key] = f"{joined[key]}, {text}" if key in joined else text
                return route.handler(HttpServerRequest(method, url.path, query, body, joined))
            return route(query)
        except ValueError as exc:
            return Response.json({"error": str(exc)}, 400)
        except Exception as exc:
            log.exception(f"{self.name}.handler_failed", path=url.path)
            return Response.json({"error": f"{type(exc).__name__}: {exc}"}, 500)


class UnixSocketHttpServer(HttpServer):
    """The HTTP server on a unix socket, mode 0600 (only root on the node may talk to it)."""

    def __init__(self, socket_path: Path, routes: Routes, *, name: str = "admin") -> None:
        super().__init__(routes, name=name)
        self.socket_path = socket_path

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
            ino = os.stat(self.socket_path).st_ino
        except OSError as exc:
            sock.close()
            raise OSError(f"bind {self.name} socket {self.socket_path}: {exc.strerror}") from exc
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await self._serve_listeners([listener])
        finally:
            self._remove_socket_file(ino)

    def _remove_socket_file(self, ino: int) -> None:
        """Unlink the socket file only if it is still ours: after a handover the path is the
        successor's socket, bound while this server was finishing its last request."""
        try:
            if os.stat(self.socket_path).st_ino == ino:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass


class TcpHttpServer(HttpServer):
    """The HTTP server on a TCP port; `port` is the bound one after start (0 picks a free one)."""

    def __init__(self, host: str, port: int, routes: Routes, *, name: str = "http") -> None:
        super().__init__(routes, name=name)
        self.host = host
        self.port = port

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host, backlog=128)
        except OSError as exc:
            why = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise OSError(f"bind {self.name} on {self.host}:{self.port}: {why}") from exc
        try:
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await self._serve_listeners(listeners)
        finally:
            for listener in listeners:
                await listener.aclose()
