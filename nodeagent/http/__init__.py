"""HTTP/1.1 proxying: h11 on both sides, routing by `nodeagent.routing`, pooled upstreams.

`HttpProxy(snapshot=…, source=…, connector=…, registry=…)` then `await proxy.serve(stream,
port=…)` per client connection; see `proxy.py` for the request path and the modules it names,
`pool.py` for upstream reuse.
"""

from nodeagent.http.errors import UpstreamOverflow
from nodeagent.http.limits import Limits
from nodeagent.http.log import RequestLog
from nodeagent.http.pool import ConnectionPool, Connector
from nodeagent.http.proxy import HttpProxy

__all__ = [
    "ConnectionPool",
    "Connector",
    "HttpProxy",
    "Limits",
    "RequestLog",
    "UpstreamOverflow",
]
