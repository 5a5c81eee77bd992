"""Pure: HTTP/2 request heads as the router sees them, the head sent upstream, response heads as
the client gets them, and local answers (a plain HTTP/2 response, or for a gRPC client a
trailers-only gRPC error: HTTP 200 with `grpc-status`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from nodeagent.http.headers import HOP_BY_HOP, forwarded_headers
from nodeagent.routing import HeaderOps, HttpRequest, RouteDecision
from nodeagent.routing.grpc import is_grpc, parse_grpc_status

Headers = list[tuple[bytes, bytes]]


class BadRequest(ValueError):
    """A request head the proxy refuses (answered 400, or gRPC INTERNAL)."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    """The pseudo-headers and the regular headers (text, lower-case names, in order)."""

    method: str
    scheme: str
    authority: str
    path: str
    headers: list[tuple[str, str]]

    @property
    def grpc(self) -> bool:
        return is_grpc(self.header("content-type"))

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def parse_request(raw: Headers) -> RequestHead:
    pseudo: dict[str, str] = {}
    headers: list[tuple[str, str]] = []
    for k, v in raw:
        name, value = k.decode("latin-1"), v.decode("latin-1")
        if name.startswith(":"):
            pseudo[name] = value
        elif name == "cookie" and headers and any(n == "cookie" for n, _ in headers):
            # HTTP/2 may split cookies; HTTP semantics join them with "; " (RFC 9113 §8.2.3)
            headers = [(n, f"{x}; {value}" if n == "cookie" else x) for n, x in headers]
        else:
            headers.append((name, value))
    method = pseudo.get(":method")
    if not method:
        raise BadRequest("no :method")
    if method == "CONNECT":
        raise BadRequest("CONNECT is not proxied on an HTTP/2 service port")
    path = pseudo.get(":path") or ""
    if not path.startswith("/") and not (method == "OPTIONS" and path == "*"):
        raise BadRequest(f":path {path!r} is not an absolute path")
    authority = pseudo.get(":authority") or next((v for k, v in headers if k == "host"), "")
    if not authority:
        raise BadRequest("no :authority or host")
    return RequestHead(method, pseudo.get(":scheme", "http"), authority, path, headers)


def routing_request(head: RequestHead, *, port: int, host: str | None) -> HttpRequest:
    joined: dict[str, str] = {}
    for k, v in head.headers:
        joined[k] = f"{joined[k]}, {v}" if k in joined else v
    joined.setdefault("host", head.authority)
    return HttpRequest.from_target(
        head.method, head.authority, head.path, joined, port=port, host=host
    )


def upstream_headers(
    head: RequestHead,
    request: HttpRequest,
    decision: RouteDecision,
    *,
    request_id: str,
    trace_headers: list[tuple[str, str]],
    client_address: str | None,
) -> Headers:
    """The head this hop sends upstream over HTTP/2 (`te: trailers` kept: gRPC needs it)."""
    regular = forwarded_headers(
        request,
        head.headers,
        request_id=request_id,
        trace_headers=trace_headers,
        client_address=client_address,
    )
    regular = decision.request_headers.apply(regular)
    out: Headers = [
        (b":method", head.method.encode()),
        (b":scheme", b"http"),
        (b":authority", (decision.authority or head.authority).encode("latin-1")),
        (b":path", decision.path.encode("latin-1")),
    ]
    if (head.header("te") or "").lower() == "trailers":
        out.append((b"te", b"trailers"))
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in regular if k != "te"]
    return out


def response_head(raw: Headers, ops: HeaderOps) -> tuple[int, Headers]:
    """The upstream's response head as the client gets it: its status, hop-by-hop headers
    dropped, the route's response header operations applied."""
    status = 0
    text: list[tuple[str, str]] = []
    for k, v in raw:
        if k == b":status":
            status = int(v) if v.isdigit() else 0
            continue
        name = k.decode("latin-1")
        if name.startswith(":") or name in HOP_BY_HOP:
            continue
        text.append((name, v.decode("latin-1")))
    text = ops.apply(text)
    return status, [(b":status", str(status).encode())] + [
        (k.encode("latin-1"), v.encode("latin-1")) for k, v in text
    ]


def plain_reply(status: int, body: bytes, extra: Sequence[tuple[str, str]] = ()) -> Headers:
    head: Headers = [(b":status", str(status).encode())]
    head += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
    if body:
        head += [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    return head


def grpc_reply(grpc_status: int, message: str) -> Headers:
    """A trailers-only gRPC answer: HTTP 200, the status in the head, END_STREAM on it."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(grpc_status).encode()),
        (b"grpc-message", grpc_message(message).encode("ascii")),
    ]


def grpc_message(text: str) -> str:
    """`grpc-message`'s percent-encoding: printable ASCII but '%' stays as it is."""
    return "".join(c if " " <= c <= "~" and c != "%" else quote(c, safe="") for c in text)


def grpc_status_of(headers: Headers | None) -> int | None:
    """The `grpc-status` of a head or trailers, None when absent."""
    if headers is None:
        return None
    return parse_grpc_status(next((v for k, v in headers if k == b"grpc-status"), None))
