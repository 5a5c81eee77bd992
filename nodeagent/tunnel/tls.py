"""TLS over a non-blocking TCP socket: OpenSSL on memory BIOs, driven by trio's readiness waits.

OpenSSL encrypts into and decrypts from memory (`ssl.SSLObject` with two `ssl.MemoryBIO`s), and
this stream moves the ciphertext itself, in large reads and writes: one `recv` takes every
record the kernel holds (OpenSSL on the socket reads a record's header and its body with two
syscalls, and cannot be told to read ahead from Python), and one `send` hands the kernel every
record a write made (OpenSSL on the socket writes each 16 KiB record on its own). Over veth, with
TCP_NODELAY as the tunnel sets it, that is fewer and larger segments: docs/dataplane.md has the
figures. The ciphertext is copied once more in memory, which costs less than the syscalls.

Half-close, which TLS streams usually lack: `send_eof` sends close_notify (TLS 1.3 lets the
other direction keep flowing) and then shuts the TCP write side, so the peer reads a clean EOF
and can still answer. A TCP EOF without close_notify reads as EOF too, as `SSLSocket` does by
default (`suppress_ragged_eofs`); HTTP/2 and HTTP/1.1 framing tell a truncated message.

One task may receive while another sends (OpenSSL keeps one state per direction and nothing
here blocks); two concurrent receivers or two concurrent senders are a bug. A read that makes
OpenSSL write (a KeyUpdate's answer) hands it to the kernel if it can, and otherwise leaves it
for the next send, as the `unsent` property says (`HboneConnection`'s reader then wakes its
writer).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable

import trio

WANT_READ = -1  # try_receive_into: nothing ready, wait until the socket is readable
RECV_SIZE = 256 * 1024  # ciphertext taken from the kernel per recv
ENCRYPT_SIZE = 64 * 1024  # plaintext encrypted per step of a send: bounds what waits in memory
# One scratch buffer for every stream's recv: trio runs one task at a time and nothing awaits
# between the recv and the copy into the stream's BIO.
_SCRATCH = memoryview(bytearray(RECV_SIZE))


class TlsStream(trio.abc.HalfCloseableStream):
    """A trio stream over a non-blocking TCP socket and an `SSLObject` (handshake not yet
    done). `socket` is the TCP socket (addresses, readiness), `ssl` the TLS state (ALPN,
    version, certificates)."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:  # fmt: skip
        sock.setblocking(False)
        self.socket = sock
        self.ssl = tls
        self._in = incoming
        self._out = outgoing
        self._unsent: memoryview | None = None  # ciphertext the kernel did not take yet
        self._closed = False
        self._eof_sent = False
        self._pending_error: trio.BrokenResourceError | None = None
        # Set by try_receive_into when it stopped because the socket was (almost surely) empty:
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
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        return cls(raw, tls, incoming, outgoing)

    async def do_handshake(self) -> None:
        """The handshake; ssl.SSLError or OSError when it fails (the alert OpenSSL made, if
        any, is sent first, as on a socket)."""
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                self._flush_best_effort()
                raise
            await self._flush_all_raw()
            if self._fill() < 0:
                await trio.lowlevel.wait_readable(self.socket)
        await self._flush_all_raw()

    def peer_certificate(self) -> bytes:
        cert = self.ssl.getpeercert(binary_form=True)
        if not cert:
            raise ssl.SSLError("peer presented no certificate")
        return cert

    @property
    def session_reused(self) -> bool:
        return bool(self.ssl.session_reused)

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.ssl.session

    @property
    def unsent(self) -> bool:
        """Ciphertext is waiting for the kernel (the next send or flush hands it over)."""
        return self._unsent is not None or self._out.pending > 0

    # -- moving ciphertext ---------------------------------------------------------------------

    def _fill(self) -> int:
        """One recv into the incoming BIO: bytes read, 0 at EOF (told to OpenSSL, whose next
        read then ends), -1 when the socket is empty. OSError as the socket raised it."""
        try:
            n = self.socket.recv_into(_SCRATCH)
        except BlockingIOError:
            return -1
        if n:
            self._in.write(_SCRATCH[:n])
        else:
            self._in.write_eof()
        return n

    def _flush(self) -> bool:
        """Hand the kernel the waiting ciphertext without waiting: True when none is left.
        OSError as the socket raised it."""
        send = self.socket.send
        while True:
            unsent = self._unsent
            if unsent is None:
                if not self._out.pending:
                    return True
                unsent = memoryview(self._out.read())
            try:
                sent = send(unsent)
            except BlockingIOError:
                self._unsent = unsent
                return False
            if sent == len(unsent):
                self._unsent = None
                continue
            self._unsent = unsent[sent:]
            return False

    def _flush_best_effort(self) -> None:
        with contextlib.suppress(OSError):
            self._flush()

    async def _flush_all_raw(self) -> None:
        while not self._flush():
            await trio.lowlevel.wait_writable(self.socket)

    async def _flush_all(self) -> None:
        try:
            await self._flush_all_raw()
        except OSError as exc:
            raise trio.BrokenResourceError(f"tls send: {exc}") from exc

    # -- the stream --------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or 65536
        while True:
            if self._pending_error is not None:
                exc, self._pending_error = self._pending_error, None
                raise exc
            try:
                data = self.ssl.read(size)  # b"" after the peer's close_notify
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"tls receive: {exc}") from exc
            else:
                if self._out.pending:
                    self._answer(len(data))  # a failed answer is raised by the next read
                return data
            try:
                got = self._fill()
            except OSError as exc:
                raise trio.BrokenResourceError(f"tls receive: {exc}") from exc
            if got < 0:
                await trio.lowlevel.wait_readable(self.socket)

    # -- the relay's primitives: no checkpoint unless they have to wait ------------------------

    def try_receive_into(self, view: memoryview) -> int:
        """Decrypt every record that is ready into `view`, without waiting: the byte count, 0 at
        EOF, or WANT_READ when nothing was ready. Why a loop: one `SSL_read`
        returns at most one record (16 KiB), and handing the relay's writer 4 records at once
        makes one write syscall and one loop turn out of four. An error after some bytes is
        kept and raised by the next call, so no byte is lost."""
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise exc
        total = 0
        size = len(view)
        # With a buffer, `read` returns the byte count (the stub says bytes) and takes any
        # writable buffer (the stub says bytearray).
        read: Callable[[int, memoryview], int] = self.ssl.read  # type: ignore[assignment]
        self.drained = False
        short = False  # a recv of this call took less than it could: the socket is empty
        while total < size:
            try:
                n = read(size - total, view[total:] if total else view)
            except ssl.SSLWantReadError:
                got = -1
                if not short:
                    try:
                        got = self._fill()
                    except OSError as exc:
                        return self._failed(total, exc)
                if got < 0:
                    self.drained = True
                    break
                short = got < RECV_SIZE
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return total  # close_notify or the TCP EOF: EOF now, or on the next call
            except ssl.SSLError as exc:
                return self._failed(total, exc)
            if n == 0:
                return total  # after the peer's close_notify
            total += n
        if self._out.pending:
            self._answer(total)
        return total or WANT_READ

    def _answer(self, total: int) -> int:
        """A read made OpenSSL write (a KeyUpdate's answer): to the kernel if it takes it now,
        else `unsent` (the connection's writer checks). Returns `total`."""
        try:
            self._flush()
        except OSError as exc:
            return self._failed(total, exc)
        return total

    def _failed(self, total: int, exc: Exception) -> int:
        error = trio.BrokenResourceError(f"tls receive: {exc}")
        if total:
            self._pending_error = error
            return total
        raise error from exc

    def try_send(self, data: bytes | memoryview) -> int:
        """Encrypt `data` and hand the kernel what it takes now, without waiting: len(data), or
        0 when ciphertext of an earlier send is still waiting (then nothing was taken, so the
        order holds). What the kernel did not take stays `unsent` for the next send."""
        if self._eof_sent:
            raise trio.ClosedResourceError("tls send after send_eof")
        try:
            if not self._flush():
                return 0
            self.ssl.write(data)
            self._flush()
        except (ssl.SSLError, OSError) as exc:
            raise trio.BrokenResourceError(f"tls send: {exc}") from exc
        return len(data)

    async def send_all_nowait(self, view: memoryview) -> None:
        """`send_all` without the trailing checkpoint (the relay checkpoints by itself):
        waits only when the socket is full. An empty `view` flushes what is `unsent`."""
        if self._eof_sent:
            raise trio.ClosedResourceError("tls send after send_eof")
        write = self.ssl.write
        try:
            while True:
                if not self._flush():
                    await trio.lowlevel.wait_writable(self.socket)
                    continue
                if not view:
                    return
                piece = view[:ENCRYPT_SIZE]
                write(piece)
                view = view[len(piece) :]
        except (ssl.SSLError, OSError) as exc:
            raise trio.BrokenResourceError(f"tls send: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all_nowait(memoryview(data))
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self.unsent:
            await self._flush_all()
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            # Sends close_notify; the second half of SSL_shutdown waits for the peer's, which
            # we do not want (half-close), hence SSLWantReadError is expected.
            with contextlib.suppress(ssl.SSLWantReadError):
                self.ssl.unwrap()
            self._eof_sent = True
            await self._flush_all_raw()
            self.socket.shutdown(socket.SHUT_WR)
        except (ssl.SSLError, OSError) as exc:
            raise trio.BrokenResourceError(f"tls send_eof: {exc}") from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
