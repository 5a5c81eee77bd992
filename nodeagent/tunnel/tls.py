"""TLS over a non-blocking `ssl.SSLSocket`, driven by trio's readiness waits.

Why not `trio.SSLStream`: it pushes every byte through memory BIOs in Python, and measured
slower for bulk (docs/dataplane.md has the figures); OpenSSL reading and writing the socket
itself avoids those copies. This stream also supports half-close, which TLS streams usually
do not: `send_eof` sends close_notify (TLS 1.3 lets the other direction keep flowing) and then
shuts the TCP write side, so the peer reads a clean EOF and can still answer.

One task may receive while another sends (OpenSSL keeps one state per direction and nothing
here blocks); two concurrent receivers or two concurrent senders are a bug.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
WANT_READ = -1  # try_receive_into: nothing ready, wait until the socket is readable
WANT_WRITE = -2  # try_receive_into: OpenSSL must write first (e.g. a key update)


class TlsStream(trio.abc.HalfCloseableStream):
    """A trio stream over a non-blocking SSLSocket (handshake not yet done)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        self._eof_sent = False
        self._pending_error: trio.BrokenResourceError | None = None
        # Set by try_receive_into when it stopped on WANT_READ: the socket was empty then, so
        # the next read should wait for readability first instead of failing once more.
        self.drained = False

    # -- set-up ------------------------------------------------------------------------------

    @classmethod
    def wrap(
        cls,
        raw: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        session: ssl.SSLSession | None = None,
        server_hostname: str | None = None,
    ) -> TlsStream:
        sock = context.wrap_socket(
            raw,
            server_side=server_side,
            do_handshake_on_connect=False,
            session=session,
            server_hostname=server_hostname,
        )
        return cls(sock)

    async def do_handshake(self) -> None:
        while True:
            try:
                self.socket.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)

    def peer_certificate(self) -> bytes:
        cert = self.socket.getpeercert(binary_form=True)
        if not cert:
            raise ssl.SSLError("peer presented no certificate")
        return cert

    @property
    def session_reused(self) -> bool:
        return bool(self.socket.session_reused)

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.socket.session

    # -- the stream --------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or 65536
        while True:
            try:
                return self.socket.recv(size)
            except ssl.SSLZeroReturnError:
                return b""  # close_notify after our own: a clean EOF
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(f"tls receive: {exc}") from exc

    # -- the relay's primitives: no checkpoint unless they have to wait ------------------------

    def try_receive_into(self, view: memoryview) -> int:
        """Decrypt every record that is ready into `view`, without waiting: the byte count, 0 at
        EOF, or WANT_READ / WANT_WRITE when nothing was ready. Why a loop: one `SSL_read`
        returns at most one record (16 KiB), and handing the relay's writer 4 records at once
        makes one write syscall and one loop turn out of four. An error after some bytes is
        kept and raised by the next call, so no byte is lost."""
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise exc
        total = 0
        size = len(view)
        recv_into = self.socket.recv_into
        self.drained = False
        while total < size:
            try:
                n = recv_into(view[total:] if total else view)
            except ssl.SSLZeroReturnError:
                return total  # close_notify: EOF now, or on the next call (it repeats)
            except ssl.SSLWantReadError:
                self.drained = True
                return total or WANT_READ
            except ssl.SSLWantWriteError:
                return total or WANT_WRITE
            except (ssl.SSLError, OSError) as exc:
                error = trio.BrokenResourceError(f"tls receive: {exc}")
                if total:
                    self._pending_error = error
                    return total
                raise error from exc
            if n == 0:
                return total  # EOF
            total += n
        return total

    async def send_all_nowait(self, view: memoryview) -> None:
        """`send_all` without the trailing checkpoint (the relay checkpoints by itself):
        waits only when the socket is full."""
        if self._eof_sent:
            raise trio.ClosedResourceError("tls send after send_eof")
        send = self.socket.send
        # OpenSSL writes a whole buffer or nothing (no partial-write mode); after WANT_WRITE the
        # same buffer is retried, which SSLSocket allows (it sets ACCEPT_MOVING_WRITE_BUFFER).
        while view:
            try:
                sent = send(view)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
                continue
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
                continue
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(f"tls send: {exc}") from exc
            view = view[sent:]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all_nowait(memoryview(data))
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._eof_sent = True
        sslobj: Any = getattr(self.socket, "_sslobj", None)
        try:
            if sslobj is not None:
                # Sends close_notify; the second half of SSL_shutdown waits for the peer's,
                # which we do not want (half-close), hence SSLWantReadError is expected.
                for _ in range(16):
                    try:
                        sslobj.shutdown()
                        break
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLWantWriteError:
                        await trio.lowlevel.wait_writable(self.socket)
            # The base class method: SSLSocket.shutdown would drop the TLS object.
            socket.socket.shutdown(self.socket, socket.SHUT_WR)
        except (ssl.SSLError, OSError) as exc:
            raise trio.BrokenResourceError(f"tls send_eof: {exc}") from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
