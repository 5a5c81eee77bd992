"""The one client of the agent's admin socket: HTTP/1.1 over the unix socket, on `httpclient`.

`await admin_request(sock, method, target)` gives `(status, body)`; `await admin_json(sock,
path)` the decoded JSON of a 2xx answer. Every failure (no socket, refused, permission, timeout,
bad HTTP, an error status) is one `AdminClientError` whose message names the socket and why, so
callers print it as it is. Sync callers (the `nodeagent admin` CLI, the sandbox, the demo) use the
`_sync` forms, which run the same request in a trio loop of their own; `is_ready(sock)` is the
readiness poll.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from nodeagent.contract import READY_PATH
from nodeagent.httpclient import HttpClientError, HttpConnection

TIMEOUT = 10.0
MAX_RESPONSE = 64 * 1024 * 1024
T = TypeVar("T")


class AdminClientError(Exception):
    """A request to the admin socket failed; the message is one line for an operator."""


def _connector(sock_path: Path) -> Callable[[], Any]:
    async def connect() -> trio.abc.Stream:
        try:
            return await trio.open_unix_socket(str(sock_path))
        except FileNotFoundError:
            raise AdminClientError(
                f"admin socket {sock_path} does not exist: is the agent running on this node? "
                "(--socket PATH)"
            ) from None
        except ConnectionRefusedError:
            raise AdminClientError(
                f"admin socket {sock_path} refused the connection: the agent is not listening"
            ) from None
        except PermissionError:
            raise AdminClientError(
                f"admin socket {sock_path}: permission denied (run as root)"
            ) from None
        except OSError as exc:
            raise AdminClientError(f"admin socket {sock_path}: {exc.strerror or exc}") from None

    return connect


async def admin_request(
    sock_path: Path, method: str, target: str, *, limit: int = MAX_RESPONSE
) -> tuple[int, bytes]:
    """One request on its own connection; (status, body). Raises AdminClientError. Timeouts are
    the caller's cancel scope (the `_sync` forms set one)."""
    try:
        conn = await HttpConnection.open(
            "agent",
            0,
            host_header="agent",
            connector=_connector(sock_path),
            peer=f"admin socket {sock_path}",
        )
        try:
            await conn.send(method, target, [("connection", "close")], b"")
            status = await conn.read_head()
            return status, await conn.read_body(limit)
        finally:
            await conn.aclose()
    except HttpClientError as exc:
        raise AdminClientError(f"admin socket {sock_path}: {method} {target}: {exc}") from None


async def admin_call(sock_path: Path, method: str, target: str) -> bytes:
    """The body of a 2xx answer; an error status raises with the server's `error` message."""
    status, body = await admin_request(sock_path, method, target)
    if status >= 400:
        try:
            why = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            why = body.decode(errors="replace").strip()
        raise AdminClientError(f"{method} {target}: HTTP {status}: {why}")
    return body


async def admin_json(sock_path: Path, path: str) -> Any:
    """GET `path` → the decoded JSON of a 2xx answer."""
    body = await admin_call(sock_path, "GET", path)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise AdminClientError(f"admin socket {sock_path}: GET {path}: not JSON: {exc}") from None


def _run_bounded(fn: Callable[[], Awaitable[T]], what: str, seconds: float) -> T:
    async def bounded() -> T:
        try:
            with trio.fail_after(seconds):
                return await fn()
        except trio.TooSlowError:
            raise AdminClientError(f"{what}: no answer within {seconds:g} s") from None

    return trio.run(bounded)


def admin_call_sync(
    sock_path: Path, method: str, target: str, *, timeout: float = TIMEOUT
) -> bytes:
    what = f"admin socket {sock_path}: {method} {target}"
    return _run_bounded(partial(admin_call, sock_path, method, target), what, timeout)


def admin_json_sync(sock_path: Path, path: str, *, timeout: float = TIMEOUT) -> Any:
    what = f"admin socket {sock_path}: GET {path}"
    return _run_bounded(partial(admin_json, sock_path, path), what, timeout)


def is_ready(sock_path: Path, *, timeout: float = 1.0) -> bool:
    """True when the agent answers 200 on the readiness path (no answer or any other: False)."""
    request = partial(admin_request, sock_path, "GET", READY_PATH)
    try:
        status, _ = _run_bounded(request, f"admin socket {sock_path}", timeout)
    except AdminClientError:
        return False
    return status == 200
