"""The agent's CNI endpoint: a unix socket serving one plugin request per connection.

`CniServer.run` binds the socket (mode 0600, race-free: bound in a private directory, then
renamed into place, which also replaces a stale socket), reports `started()` once listening,
and serves each connection in its own task under a deadline. It maps everything to a reply:
a malformed request, an `EnrollError`, a timeout, even a handler bug (code 999) — a
connection's failure never reaches the server. The socket file is removed on exit if it is
still ours.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket as stdlib_socket
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from nodeagent.cni.errors import EnrollError, ErrorCode, ProtocolError
from nodeagent.cni.handler import CniHandler
from nodeagent.cni.protocol import (
    CLOSED,
    NEED_DATA,
    CniReply,
    CniRequest,
    Command,
    FrameDecoder,
    encode_frame,
)
from nodeagent.contract import CNI_SOCKET
from nodeagent.log import get_logger

log = get_logger("cni.server")

DEFAULT_SOCKET = str(CNI_SOCKET)
# Below the plugin's default timeoutSeconds (30), so the plugin gets our explanation rather
# than its own "no reply".
DEFAULT_TIMEOUT = 25.0
# Sending the reply gets its own short deadline, also after the request deadline expired.
REPLY_TIMEOUT = 2.0
_RECV_SIZE = 65536


@dataclass(frozen=True, slots=True)
class CniServerStatistics:
    connections: int
    active: int
    replies: dict[str, int]


class CniServer:
    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        handler: CniHandler,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.handler = handler
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._active = 0
        self._replies: Counter[str] = Counter()

    def statistics(self) -> CniServerStatistics:
        return CniServerStatistics(
            connections=sum(self._replies.values()) + self._active,
            active=self._active,
            replies=dict(self._replies),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock, ino = self._bind()
        try:
            listener = trio.SocketListener(sock)
            log.info("cni.server.listening", socket=self.socket_path)
            task_status.started()
            await trio.serve_listeners(self._serve, [listener])
        finally:
            sock.close()
            self._remove_socket_file(ino)

    # --- socket file ------------------------------------------------------------------------

    def _bind(self) -> tuple[trio.socket.SocketType, int]:
        # Synchronous on purpose: local filesystem and unix-socket calls that do not block,
        # done once at start-up before anything else runs.
        path = self.socket_path
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise OSError(
                exc.errno, f"create CNI socket directory {parent}: {exc.strerror}"
            ) from None
        self._refuse_live_socket(path)
        sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            # Bind inside a fresh 0700 directory, tighten the mode, then rename into place:
            # nobody can connect before the mode is 0600, and a stale file is replaced atomically.
            private = tempfile.mkdtemp(prefix=".cni-sock-", dir=parent)
            tmp_path = os.path.join(private, "s")
            try:
                sock.bind(tmp_path)
                os.chmod(tmp_path, 0o600)
                sock.listen(128)
                os.rename(tmp_path, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_path)
                os.rmdir(private)
            ino = os.stat(path).st_ino
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"bind CNI socket {path}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        return trio.socket.from_stdlib_socket(sock), ino

    @staticmethod
    def _refuse_live_socket(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"bind CNI socket {path}: exists and is not a socket")
        with stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                return  # stale: left by an agent that died; replaced by the rename
        raise OSError(
            errno.EADDRINUSE,
            f"bind CNI socket {path}: another process is serving it "
            "(is a second agent running on this node?)",
        )

    def _remove_socket_file(self, ino: int) -> None:
        try:
            if os.stat(self.socket_path).st_ino == ino:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cni.server.cleanup_failed", socket=self.socket_path, error=str(exc))

    # --- connections ------------------------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = next(self._ids)
        self._active += 1
        started = trio.current_time()
        fields: dict[str, Any] = {"conn": conn}
        reply: CniReply | None = None
        try:
            with trio.move_on_after(self.timeout) as scope:
                reply = await self._process(stream, fields)
            if scope.cancelled_caught:
                what = fields.get("cmd", "request")
                reply = CniReply.failure(
                    ErrorCode.TRY_AGAIN_LATER,
                    f"mesh node agent did not finish {what} within {self.timeout:g}s",
                    f"pod {fields['pod']}" if "pod" in fields else "",
                )
            if reply is not None:
                with trio.move_on_after(REPLY_TIMEOUT):
                    await stream.send_all(encode_frame(reply.to_message()))
        except trio.BrokenResourceError:
            fields["error"] = "client went away before the reply"
        finally:
            self._active -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()
        outcome = "none" if reply is None else ("ok" if reply.ok else "error")
        self._replies[outcome] += 1
        ms = round((trio.current_time() - started) * 1000, 1)
        if reply is None or not reply.ok:
            code = None if reply is None else reply.code
            msg = None if reply is None else reply.msg
            log.warning("cni.request.failed", code=code, msg=msg, ms=ms, **fields)
        else:
            log.info("cni.request.complete", skipped=reply.skipped, ms=ms, **fields)

    async def _process(self, stream: trio.SocketStream, fields: dict[str, Any]) -> CniReply | None:
        decoder = FrameDecoder()
        try:
            while True:
                event = decoder.next_event()
                if event is NEED_DATA:
                    decoder.receive_data(await stream.receive_some(_RECV_SIZE))
                    continue
                if event is CLOSED:
                    fields["error"] = "closed without a request"
                    return None
                assert isinstance(event, dict)
                req = CniRequest.from_message(event)
                break
        except ProtocolError as exc:
            fields["error"] = exc.msg
            return CniReply.failure(exc.code, f"bad request to the mesh node agent: {exc.msg}")
        except trio.BrokenResourceError:
            fields["error"] = "client went away"
            return None
        fields.update(cmd=str(req.command), container=req.container_id[:12])
        if req.pod.name:
            fields["pod"] = str(req.pod)
        return await self._dispatch(req, fields)

    async def _dispatch(self, req: CniRequest, fields: dict[str, Any]) -> CniReply:
        try:
            if req.command is Command.ADD:
                enrolled = await self.handler.add(req)
                return CniReply.success(skipped=not enrolled)
            if req.command is Command.DEL:
                await self.handler.delete(req)
            elif req.command is Command.CHECK:
                await self.handler.check(req)
            elif req.command is Command.STATUS:
                await self.handler.status()
            else:
                await self.handler.gc(list(req.valid_attachments))
            return CniReply.success()
        except EnrollError as exc:
            return CniReply.failure(exc.code, exc.msg, exc.details)
        except Exception as exc:
            # A handler bug: report it to the plugin (and the operator) and keep serving.
            log.exception("cni.handler.crashed", **fields)
            target = f"pod {req.pod}" if req.pod.name else "the node"
            return CniReply.failure(
                ErrorCode.INTERNAL,
                f"mesh node agent failed {req.command} for {target}: {type(exc).__name__}: {exc}",
            )
