"""Pure: what the destination agent's HTTP/2 server (`inbound.py`) sends, for one stream: the
head it forwards to its own app, and its local answers (a refusal of the guard, a bad request).

The forwarded head is the request as the source agent sent it (routing, rewrites and forwarding
headers were applied there), with the trust-boundary changes of the HTTP/1.1 destination
(`nodeagent.http.headers.destination_head`): hop-by-hop headers dropped (`te: trailers` kept:
gRPC needs it), the client's `x-forwarded-client-cert` replaced by Istio's, authentication's
header and query changes applied, the trace headers replaced by this hop's SERVER span.

A gRPC client is refused as Envoy's local replies answer one: HTTP 200, trailers-only, with
`grpc-status` (401 → 16 UNAUTHENTICATED, 403 → 7 PERMISSION_DENIED) and the body's text as
`grpc-message`; any other client gets the status and body as HTTP/1.1 does.
"""

from __future__ import annotations

from collections.abc import Sequence

from nodeagent.http.headers import HOP_BY_HOP, XFCC, without_params
from nodeagent.http2.messages import Headers, RequestHead, grpc_reply, plain_reply
from nodeagent.routing.grpc import http_to_grpc_status
from nodeagent.telemetry.tracing import TRACE_HEADERS

_NONE: frozenset[str] = frozenset()


def destination_headers(
    head: RequestHead,
    *,
    xfcc: str | None,
    remove: frozenset[str] = _NONE,
    add: Sequence[tuple[str, str]] = (),
    strip_params: frozenset[str] = _NONE,
    trace_headers: Sequence[tuple[str, str]] = (),
) -> Headers:
    """The HTTP/2 head the destination sends its app for `head` (see the module's doc)."""
    path = without_params(head.path, strip_params) if strip_params else head.path
    out: Headers = [
        (b":method", head.method.encode("latin-1")),
        (b":scheme", b"http"),
        (b":authority", head.authority.encode("latin-1")),
        (b":path", path.encode("latin-1")),
    ]
    if (head.header("te") or "").lower() == "trailers":
        out.append((b"te", b"trailers"))
    for k, v in head.headers:
        if k in HOP_BY_HOP or k == XFCC or k == "host" or k in remove:
            continue
        if trace_headers and k.encode("latin-1") in TRACE_HEADERS:
            continue
        out.append((k.encode("latin-1"), v.encode("latin-1")))
    for k, v in (*trace_headers, *add):
        out.append((k.encode("latin-1"), v.encode("latin-1")))
    if xfcc is not None:
        out.append((XFCC.encode(), xfcc.encode("latin-1")))
    return out


def local_answer(status: int, body: bytes, *, grpc: bool) -> tuple[Headers, bytes, int | None]:
    """A local answer to a stream: its head, its body (b"": END_STREAM on the head) and, for a
    gRPC client, the grpc-status the head carries."""
    if grpc and status >= 400:
        grpc_status = int(http_to_grpc_status(status))
        message = body.decode("utf-8", "replace") or str(status)
        return grpc_reply(grpc_status, message), b"", grpc_status
    return plain_reply(status, body), body, None
