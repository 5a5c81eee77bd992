"""HTTP/1.1 proxying: h11 on both sides, routing by `nodeagent.routing`, pooled upstreams.

`HttpProxy(snapshot=…, source=…, connector=…, picker=…)` then `await proxy.serve(stream, port=…)`
per client connection; see `proxy.py` for the request path and `pool.py` for upstream reuse.
"""

from nodeagent.http.errors import UpstreamOverflow
from nodeagent.http.pool import ConnectionPool, Connector
from nodeagent.http.proxy import HttpProxy, Limits, Picker, RequestLog, random_picker

__all__ = [
    "ConnectionPool",
    "Connector",
    "HttpProxy",
    "Limits",
    "Picker",
    "RequestLog",
    "UpstreamOverflow",
    "random_picker",
]
