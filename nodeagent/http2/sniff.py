"""What a client speaks, from its first bytes: the HTTP/2 connection preface, an HTTP/1.x request
line, or something else. `classify` is pure; `sniff` peeks at a socket (MSG_PEEK: the bytes stay
for whoever serves the connection), bounded in time so that a server-first protocol (the client
waits for the server to speak: MySQL, SMTP) is not stalled: no byte within the timeout → TCP.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Literal

import trio

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Sniffed = Literal["h2", "http1", "tcp"]
# An HTTP/1.x request line's start: a token method, a space (RFC 9112 §3). The rest of the
# line decides nothing here: the HTTP/1.1 proxy's framing checks it.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,20} ")
_MAX_METHOD = 21
SNIFF_BYTES = len(PREFACE)


def classify(data: bytes) -> Sniffed | None:
    """The protocol `data` (the first bytes of a connection) starts, None while undecided."""
    if PREFACE.startswith(data[: len(PREFACE)]):
        return "h2" if len(data) >= len(PREFACE) else None
    if data.startswith(b"PRI * HTTP/2.0"):
        return "tcp"  # a broken preface is nothing we can proxy as HTTP
    if _METHOD.match(data):
        return "http1"
    head = data[:_MAX_METHOD]
    if len(data) < _MAX_METHOD and re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*", head):
        return None  # still a method token so far
    return "tcp"


def classify_declared(data: bytes) -> Sniffed | None:
    """On a port declared HTTP or HTTP/2: h2 (prior knowledge) or else HTTP/1.1, decided by
    the first byte that differs from the preface (the first byte of any method but P…), so a
    client trickling its request line is never held here."""
    n = min(len(data), len(PREFACE))
    if data[:n] != PREFACE[:n]:
        return "http1"
    return "h2" if len(data) >= len(PREFACE) else None


async def sniff(
    sock: trio.socket.SocketType,
    within: float,
    classifier: Callable[[bytes], Sniffed | None] = classify,
) -> Sniffed:
    """Peek until the first bytes decide (`classifier`), the client closes, or `within`
    seconds pass (→ tcp)."""
    with trio.move_on_after(within):
        while True:
            try:
                data = await sock.recv(SNIFF_BYTES, socket.MSG_PEEK)
            except OSError:
                return "tcp"
            if not data:
                return "tcp"
            got = classifier(data)
            if got is not None:
                return got
            # Undecided on a short read: wait for more than what is queued already.
            await trio.sleep(0.001)
    return "tcp"
