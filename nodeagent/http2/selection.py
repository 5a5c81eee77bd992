"""Pure: which HTTP codec a request's upstream speaks: a function of the destination port's
declared protocol (`ServicePort.l7_protocol`), not of the client's, as Envoy's clusters are
configured from the service port: `http2`/`grpc`/`h2c` ports get HTTP/2 whatever the client
spoke (an HTTP/1.1 client is translated), `http` ports get HTTP/1.1 (an HTTP/2 client is
translated: the destination agent parses HTTP/1.1 there); a port whose protocol was sniffed (not
declared) gets the client's own protocol (Istio's behaviour for auto-detected ports).

The one rule for the source agent (which proxy serves a connection: `proxy/outbound_path.py`)
and for the HTTP/2 proxy (which upstream each request takes, the ingress gateway's included).
"""

from __future__ import annotations

from typing import Literal

from nodeagent.routing import RouteDestination
from nodeagent.snapshot import L7Protocol, ServicePort

Codec = Literal["http1", "h2"]


def upstream_codec(port: ServicePort | None, client: Codec) -> Codec:
    """The codec towards the endpoints of `port` (None: not a known service port) for a
    request that arrived in `client`'s."""
    declared = port.l7_protocol if port is not None else L7Protocol.SNIFF
    if declared is L7Protocol.HTTP2:
        return "h2"
    if declared is L7Protocol.HTTP1:
        return "http1"
    return client


def destination_port(dest: RouteDestination) -> ServicePort | None:
    """The service port a route destination names."""
    if dest.service is None or dest.port is None:
        return None
    return dest.service.port(dest.port)
