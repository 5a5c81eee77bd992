"""The mesh tunnel (port 15008): HBONE, i.e. HTTP/2 CONNECT streams over pooled mutual TLS 1.3.

`TunnelPool` (client: one per source pod, connections opened from its netns with the source
workload's certificate, the server's SPIFFE id checked) hands out `HboneStream`s, one per
application connection; `accept_hbone` (server: destination workload certificate, client
verified) returns the `HboneConnection` the inbound path runs with a per-stream handler.
`hbone.py` is the sans-IO wire (headers, statuses, SETTINGS; docs/protocol.md), `h2conn.py`
drives the `h2` state machine over `tls.py`'s TLS stream, `pool.py` is the client pool;
`credentials.py` says how long a client connection may carry new streams (its certificates).
"""

from __future__ import annotations

from nodeagent.tunnel.client import SessionCache, TunnelInfo, connect_hbone
from nodeagent.tunnel.credentials import TunnelCredentials
from nodeagent.tunnel.errors import TunnelError
from nodeagent.tunnel.h2conn import HboneConnection, HboneStream
from nodeagent.tunnel.hbone import ConnectRequest, HboneError, SourceInfo
from nodeagent.tunnel.pool import PoolBook, TunnelPool
from nodeagent.tunnel.server import accept_hbone, detach
from nodeagent.tunnel.tls import TlsStream

__all__ = [
    "ConnectRequest",
    "HboneConnection",
    "HboneError",
    "HboneStream",
    "PoolBook",
    "SessionCache",
    "SourceInfo",
    "TlsStream",
    "TunnelCredentials",
    "TunnelError",
    "TunnelInfo",
    "TunnelPool",
    "accept_hbone",
    "connect_hbone",
    "detach",
]
