"""The project's one HTTP/1.1 client: h11 over trio, plain or TLS, bounded, sans-IO underneath.

Used by the etcd store backend (`nodeagent.store.etcd_http`, keep-alive JSON POSTs and watch
streams) and the Kubernetes client (`nodeagent.kube.client`, one connection per request).
`connection.py` moves the bytes, `jsonlines.py` parses newline-delimited JSON bodies,
`errors.py` holds the errors callers translate into their own.
"""

from nodeagent.httpclient.connection import MAX_BODY, Body, Connector, HttpConnection
from nodeagent.httpclient.errors import ConnectError, HttpClientError, Lost, NotSent, ProtocolError
from nodeagent.httpclient.jsonlines import MAX_MESSAGE, NEED_DATA, JsonLines, parse_object

__all__ = [
    "MAX_BODY",
    "MAX_MESSAGE",
    "NEED_DATA",
    "Body",
    "ConnectError",
    "Connector",
    "HttpClientError",
    "HttpConnection",
    "JsonLines",
    "Lost",
    "NotSent",
    "ProtocolError",
    "parse_object",
]
