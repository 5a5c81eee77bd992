"""The in-pod DNS proxy: UDP and TCP servers on 15053 inside one pod's netns.

The pod's queries to port 53 are REDIRECTed here by the capture rules (`nodeagent.inpod.rules`,
`dns_capture`). REDIRECT rewrites the destination of locally generated packets to 127.0.0.1, so
both sockets bind 127.0.0.1:15053 in the pod netns, as ztunnel's in-pod DNS proxy does; nothing
outside the pod can reach them. The conntrack entry REDIRECT made rewrites our replies' source back
to the server the app asked, so the app sees its own resolver answer.

Each query is decided by `resolve.answer` against the current snapshot (a callable, read once per
query, never awaited): mesh names are answered here, everything else is forwarded *unchanged*
(same bytes, same ID, EDNS and all) to the upstream servers — the node's resolvers by default —
from sockets opened in the agent's own netns (or `upstream_netns`), over the transport the client
used. Upstreams are tried in order within one overall `timeout`; none answering → SERVFAIL.

Bounds: forwarded queries in flight (`max_inflight`, beyond it SERVFAIL at once), TCP
connections (`max_tcp_connections`, beyond it closed at once), an idle timeout per TCP
connection, 65535-byte messages, a bounded TCP framing buffer. Malformed queries get FORMERR
when their header is readable, else nothing. One debug log line per query; info for failures.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from nodeagent.contract import DNS_CAPTURE_PORT, MESH_MARK
from nodeagent.dns import resolve
from nodeagent.dns.errors import FramingError, MessageError, ProxyError
from nodeagent.dns.message import (
    MAX_MESSAGE,
    OPCODE_QUERY,
    RCODE_FORMERR,
    RCODE_NAMES,
    RCODE_NOTIMP,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_NAMES,
    Message,
    TcpFramer,
    build_response,
    error_response,
    name_text,
    parse_message,
    response_limit,
)
from nodeagent.dns.upstream import Upstream, parse_upstreams, system_upstreams
from nodeagent.inpod import Netns, NetnsError
from nodeagent.log import get_logger
from nodeagent.snapshot import Snapshot

log = get_logger("dns")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_INFLIGHT = 128
DEFAULT_MAX_TCP_CONNECTIONS = 64
DEFAULT_TCP_IDLE_TIMEOUT = 5.0  # ztunnel's DEFAULT_TCP_REQUEST_TIMEOUT
_RECV = MAX_MESSAGE + 1  # one more than the largest message, so an oversized one is seen
_query_ids = itertools.count(1)


@dataclass(slots=True)
class _Pending:
    """A query to forward, with what its log line needs."""

    query: Message
    raw: bytes
    transport: str
    reason: str
    started: float


class DnsProxy:
    """The DNS proxy of one pod: `await nursery.start(DnsProxy(netns, ...).run)`.

    `run` binds UDP and TCP on `host:port` inside `netns` (with the mesh mark, like every agent
    socket in a pod) and calls `started()` only once both are bound; a bind failure raises
    ProxyError naming the port, protocol and netns. Cancel the scope to stop it.
    """

    def __init__(
        self,
        netns: Netns,
        *,
        namespace: str,
        snapshot: Callable[[], Snapshot],
        upstreams: Iterable[str | Upstream] | None = None,
        upstream_netns: Netns | None = None,
        host: str = DEFAULT_HOST,
        port: int = DNS_CAPTURE_PORT,
        timeout: float = DEFAULT_TIMEOUT,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_tcp_connections: int = DEFAULT_MAX_TCP_CONNECTIONS,
        tcp_idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT,
        pod: str | None = None,
        mark: int = MESH_MARK,
    ) -> None:
        self.netns = netns
        self.namespace = namespace
        self._snapshot = snapshot
        self.upstreams = parse_upstreams(system_upstreams() if upstreams is None else upstreams)
        self.upstream_netns = upstream_netns
        self.host = host
        self.port = port
        if timeout <= 0 or max_inflight < 1 or max_tcp_connections < 1 or tcp_idle_timeout <= 0:
            raise ValueError("DnsProxy: timeouts must be > 0 and limits >= 1")
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout = tcp_idle_timeout
        self.pod = pod or netns.name
        self.mark = mark
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._inflight = 0
        self._tcp_connections = 0
        self._stats = dict.fromkeys(
            ("queries", "answered", "forwarded", "forward_failed", "malformed", "overloaded",
             "tcp_refused"),
            0,
        )  # fmt: skip
        self._random = random.Random()

    def statistics(self) -> dict[str, int]:
        return {**self._stats, "inflight": self._inflight, "tcp_connections": self._tcp_connections}

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        udp = self._bind(socket.SOCK_DGRAM)
        try:
            tcp = self._bind(socket.SOCK_STREAM)
        except BaseException:
            udp.close()
            raise
        with udp, tcp:
            self.udp_address = udp.getsockname()
            self.tcp_address = tcp.getsockname()
            log.info("dns.started", pod=self.pod, netns=self.netns.name, address=self.host,
                     port=self.port, upstreams=[f"{h}:{p}" for h, p in self.upstreams])  # fmt: skip
            if not self.upstreams:
                log.warning("dns.no_upstreams", pod=self.pod,
                            why="no upstream DNS servers: non-mesh names get SERVFAIL")  # fmt: skip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp, nursery)
                nursery.start_soon(self._serve_tcp, tcp, nursery)
                task_status.started()

    def _bind(self, kind: int) -> trio.socket.SocketType:
        proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
        where = f"bind {self.host}:{self.port}/{proto} in netns {self.netns.name}"
        try:
            sock = self.netns.socket(socket.AF_INET, kind, mark=self.mark)
        except NetnsError as e:
            raise ProxyError(f"{where}: {e}", errno=e.errno) from None
        try:
            if kind == socket.SOCK_STREAM:
                # A restarted agent must re-bind while old connections sit in TIME_WAIT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # ...and beside the agent it replaces while that one drains (inpod.listeners).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
        except OSError as e:
            sock.close()
            why = "address in use" if e.errno == errno.EADDRINUSE else os.strerror(e.errno or 0)
            raise ProxyError(f"{where}: {why}", errno=e.errno) from None
        return trio.socket.from_stdlib_socket(sock)

    # -- deciding ----------------------------------------------------------------------------

    def _decide(self, data: bytes, transport: str, peer: str) -> bytes | _Pending | None:
        """A reply to send now (None: send nothing), or a query to forward."""
        started = time.perf_counter()
        self._stats["queries"] += 1
        try:
            query = parse_message(data)
        except MessageError as e:
            self._stats["malformed"] += 1
            log.info("dns.query.malformed", pod=self.pod, transport=transport, peer=peer,
                     error=str(e), replied=e.id is not None)  # fmt: skip
            return error_response(data, RCODE_FORMERR) if e.id is not None else None
        if query.is_response:
            self._stats["malformed"] += 1
            log.info("dns.query.malformed", pod=self.pod, transport=transport, peer=peer,
                     error="a response, not a query", replied=False)  # fmt: skip
            return None
        if query.opcode != OPCODE_QUERY or len(query.questions) != 1:
            rcode = RCODE_NOTIMP if query.opcode != OPCODE_QUERY else RCODE_FORMERR
            self._stats["malformed"] += 1
            log.info("dns.query.malformed", pod=self.pod, transport=transport, peer=peer,
                     error=f"opcode {query.opcode}, {len(query.questions)} questions",
                     replied=True)  # fmt: skip
            return build_response(query, rcode, max_size=response_limit(query, tcp=False))
        question = query.questions[0]
        decision = resolve.answer(self._snapshot(), self.namespace, question)
        if isinstance(decision, resolve.Forward):
            return _Pending(query, data, transport, decision.reason, started)
        self._stats["answered"] += 1
        records = list(decision.records)
        # Spread clients over the addresses (headless pods): shuffle the A records only, the
        # CNAME must stay first.
        a_start = next((i for i, r in enumerate(records) if r.rtype == TYPE_A), len(records))
        tail = records[a_start:]
        self._random.shuffle(tail)
        reply = build_response(
            query,
            decision.rcode,
            (*records[:a_start], *tail),
            authoritative=True,
            max_size=response_limit(query, tcp=transport == "tcp"),
        )
        log.debug("dns.query", pod=self.pod, namespace=self.namespace, transport=transport,
                  peer=peer, id=query.id, name=question.text, type=_type(question.qtype),
                  result="mesh", service=decision.service, reason=decision.reason,
                  rcode=RCODE_NAMES.get(decision.rcode, decision.rcode), answers=len(records),
                  ms=_ms(started))  # fmt: skip
        return reply

    # -- forwarding --------------------------------------------------------------------------

    async def _forward(self, pending: _Pending) -> bytes:
        """The upstream's reply to the pending query, or our SERVFAIL when none answers."""
        q = pending.query.questions[0]
        fields = {
            "pod": self.pod,
            "namespace": self.namespace,
            "transport": pending.transport,
            "id": pending.query.id,
            "name": q.text,
            "type": _type(q.qtype),
            "reason": pending.reason,
        }
        tcp = pending.transport == "tcp"
        limit = response_limit(pending.query, tcp=tcp)
        if self._inflight >= self.max_inflight:
            self._stats["overloaded"] += 1
            log.info("dns.query.failed", **fields, result="overloaded",
                     inflight=self._inflight, ms=_ms(pending.started))  # fmt: skip
            return build_response(pending.query, RCODE_SERVFAIL, max_size=limit)
        self._inflight += 1
        errors: list[str] = []
        reply: bytes | None = None
        upstream = ""
        try:
            per_attempt = self.timeout / max(1, len(self.upstreams))
            with trio.move_on_after(self.timeout):
                for host, port in self.upstreams:
                    upstream = f"{host}:{port}"
                    try:
                        with trio.move_on_after(per_attempt) as attempt:
                            reply = await self._exchange(host, port, pending, tcp)
                        if attempt.cancelled_caught:
                            errors.append(f"{upstream}: timed out after {per_attempt:.3g}s")
                    except (OSError, FramingError) as e:
                        errors.append(f"{upstream}: {_oserror(e)}")
                    if reply is not None:
                        break
        finally:
            self._inflight -= 1
        if reply is None:
            self._stats["forward_failed"] += 1
            log.info("dns.query.failed", **fields, result="servfail",
                     errors=errors or ["no upstream DNS servers"],
                     ms=_ms(pending.started))  # fmt: skip
            return build_response(pending.query, RCODE_SERVFAIL, max_size=limit)
        self._stats["forwarded"] += 1
        log.debug("dns.query", **fields, result="forwarded", upstream=upstream,
                  ms=_ms(pending.started))  # fmt: skip
        return reply

    def _upstream_socket(self, host: str, kind: int) -> trio.socket.SocketType:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        if self.upstream_netns is not None:
            try:
                sock = self.upstream_netns.socket(family, kind, mark=0)
            except NetnsError as e:
                raise OSError(e.errno or errno.EIO, str(e)) from None
        else:
            # The calling thread is in the agent's own (the node's) netns between our calls.
            sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        return trio.socket.from_stdlib_socket(sock)

    async def _exchange(self, host: str, port: int, pending: _Pending, tcp: bool) -> bytes | None:
        sock = self._upstream_socket(host, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        with sock:
            await sock.connect((host, port))
            if not tcp:
                await sock.send(pending.raw)
                # A connected UDP socket only hears from the upstream; anything that is not
                # the answer to this query (stale, spoofed, garbage) is skipped until timeout.
                while True:
                    data = await sock.recv(_RECV)
                    if _answers(pending.query, data):
                        return data
            stream = trio.SocketStream(sock)
            await stream.send_all(TcpFramer.frame(pending.raw))
            framer = TcpFramer()
            while True:
                event = framer.next_event()
                if isinstance(event, bytes):
                    if _answers(pending.query, event):
                        return event
                    raise OSError(errno.EPROTO, "answer does not match the query")
                data = await stream.receive_some(65536)
                if not data:
                    raise OSError(errno.ECONNRESET, "closed before answering")
                framer.receive_data(data)

    # -- UDP ---------------------------------------------------------------------------------

    async def _serve_udp(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                data, addr = await sock.recvfrom(_RECV)
            except OSError as e:  # e.g. a pending ICMP error; the socket itself is fine
                log.info("dns.udp.recv_failed", pod=self.pod, error=_oserror(e))
                continue
            peer = f"{addr[0]}:{addr[1]}"
            decided = self._decide(data, "udp", peer)
            if isinstance(decided, _Pending):
                nursery.start_soon(self._forward_udp, sock, decided, addr)
            elif decided is not None:
                await self._send_udp(sock, decided, addr)

    async def _forward_udp(
        self, sock: trio.socket.SocketType, pending: _Pending, addr: tuple[str, int]
    ) -> None:
        await self._send_udp(sock, await self._forward(pending), addr)

    async def _send_udp(
        self, sock: trio.socket.SocketType, data: bytes, addr: tuple[str, int]
    ) -> None:
        try:
            await sock.sendto(data, addr)
        except OSError as e:
            log.info("dns.udp.send_failed", pod=self.pod, peer=f"{addr[0]}:{addr[1]}",
                     error=_oserror(e))  # fmt: skip

    # -- TCP ---------------------------------------------------------------------------------

    async def _serve_tcp(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        listener = trio.SocketListener(sock)
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:  # EMFILE and friends: back off briefly rather than spin
                log.info("dns.tcp.accept_failed", pod=self.pod, error=_oserror(e))
                await trio.sleep(0.1)
                continue
            if self._tcp_connections >= self.max_tcp_connections:
                self._stats["tcp_refused"] += 1
                log.info("dns.tcp.refused", pod=self.pod, connections=self._tcp_connections)
                stream.socket.close()
                continue
            self._tcp_connections += 1
            nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = next(_query_ids)
        try:
            addr = stream.socket.getpeername()
            peer = f"{addr[0]}:{addr[1]}"
        except OSError:
            peer = "?"
        framer = TcpFramer()
        try:
            async with stream:
                while True:
                    event = framer.next_event()
                    if isinstance(event, bytes):
                        decided = self._decide(event, "tcp", peer)
                        if isinstance(decided, _Pending):
                            decided = await self._forward(decided)
                        if decided is None:
                            return  # a response or garbage without a header: hang up
                        with trio.fail_after(self.tcp_idle_timeout):
                            await stream.send_all(TcpFramer.frame(decided))
                        continue
                    if framer.eof:
                        return
                    with trio.move_on_after(self.tcp_idle_timeout) as idle:
                        framer.receive_data(await stream.receive_some(65536))
                    if idle.cancelled_caught:
                        return
        except (FramingError, OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
            log.info(
                "dns.tcp.closed",
                pod=self.pod,
                conn=conn,
                peer=peer,
                error=_oserror(e) if isinstance(e, OSError) else str(e) or "send timed out",
            )
        finally:
            self._tcp_connections -= 1


def _answers(query: Message, data: bytes) -> bool:
    """Whether `data` is the upstream's answer to `query` (ID, QR and question match)."""
    try:
        reply = parse_message(data, questions_only=True)
    except MessageError:
        return False
    if reply.id != query.id or not reply.is_response:
        return False
    if not reply.questions:  # e.g. FORMERR/REFUSED from a server that echoes nothing
        return True
    a, b = reply.questions[0], query.questions[0]
    return (a.qtype, a.qclass, name_text(a.name)) == (b.qtype, b.qclass, name_text(b.name))


def _type(qtype: int) -> str:
    return TYPE_NAMES.get(qtype, str(qtype))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _oserror(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
