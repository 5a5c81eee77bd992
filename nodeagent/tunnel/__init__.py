"""The mesh tunnel (port 15008): mutual TLS 1.3 between agents, one header, then raw bytes.

`open_tunnel` (client: source pod netns, source workload certificate, checks the server's SPIFFE
id) and `accept_tunnel` (server: destination workload certificate, verifies the client, reads
the header); `header.py` is the sans-IO wire format (docs/protocol.md); `tls.py` the TLS stream;
`credentials.py` says how long a client tunnel may carry new requests (its certificates).
"""

from __future__ import annotations

from nodeagent.tunnel.client import SessionCache, TunnelInfo, open_tunnel
from nodeagent.tunnel.errors import TunnelError
from nodeagent.tunnel.header import (
    HeaderError,
    HeaderParser,
    SourceInfo,
    TunnelRequest,
    TunnelResponse,
)
from nodeagent.tunnel.server import Accepted, accept_tunnel, detach, respond
from nodeagent.tunnel.tls import TlsStream

__all__ = [
    "Accepted",
    "HeaderError",
    "HeaderParser",
    "SessionCache",
    "SourceInfo",
    "TlsStream",
    "TunnelError",
    "TunnelInfo",
    "TunnelRequest",
    "TunnelResponse",
    "accept_tunnel",
    "detach",
    "open_tunnel",
    "respond",
]
