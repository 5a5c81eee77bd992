"""The per-request security hook of the HTTP proxies (pure types, no I/O here).

The proxy that parses a request (the destination agent's inbound HTTP, the ingress gateway)
hands a `RequestFacts` to its injected `Guard` before it forwards anything; the guard
(`nodeagent.proxy.l7_guard`: RequestAuthentication, then L7 AuthorizationPolicy) answers a
`Verdict`: refuse with a status and body, or forward with the header and query changes
authentication asks for (the token stripped, claims copied to headers). The proxies stay
ignorant of policy; the policy code stays ignorant of sockets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the guard may read of one request: its head (headers in order, lower-case names)
    and its connection, the source principal only from the tunnel's verified certificate."""

    method: str
    target: str  # path and query, as the client sent it
    host: str  # the authority (Host header)
    headers: Sequence[tuple[str, str]]
    port: int  # the destination (app) port
    source_ip: str
    destination_ip: str
    source_identity: str | None  # the verified SPIFFE id; None for plaintext
    mtls: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    """The guard's answer. Allowed: forward, removing `remove_headers`, adding `add_headers`
    and dropping the query parameters `strip_params`. Refused: answer `status` with `body`.
    `details` is the access log's response_code_details, `policy` the deciding policy."""

    allowed: bool
    status: int = 200
    body: bytes = b""
    details: str = "via_upstream"
    policy: str | None = None
    request_principal: str | None = None  # <iss>/<sub> of a verified JWT
    remove_headers: frozenset[str] = frozenset()
    add_headers: tuple[tuple[str, str], ...] = ()
    strip_params: frozenset[str] = frozenset()
    audited: tuple[str, ...] = field(default=())


ALLOW_ALL = Verdict(True)
# A guard that raised (a bug, a policy the validator let through): the request is refused,
# never let through unchecked, and the connection survives.
GUARD_FAILED = Verdict(False, 500, b"authorization failed", details="authz_failed")

Guard = Callable[[RequestFacts], Awaitable[Verdict]]
