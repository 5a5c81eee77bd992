"""Errors of the DNS proxy: each names what was attempted, where, and why."""

from __future__ import annotations


class DnsError(Exception):
    """Base of every error raised by nodeagent.dns."""


class MessageError(DnsError, ValueError):
    """A DNS message that is malformed or breaks a bound (RFC 1035 wire format).

    `id` is the message ID when the 12-byte header was readable, so that the caller can still
    answer FORMERR; None means the bytes are not even a header and the only safe reply is none.
    """

    def __init__(self, message: str, *, id: int | None = None) -> None:
        super().__init__(message)
        self.id = id


class FramingError(DnsError, ValueError):
    """The 2-byte length framing of DNS over TCP is broken (zero length, oversized)."""


class ProxyError(DnsError):
    """The DNS proxy could not start: a bind inside the pod netns, a socket, the upstreams."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
