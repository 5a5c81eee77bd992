"""Pure: HTTP/1.1 heads as HTTP/2 heads and back, for the bridges between the two codecs
(`h1client.py`: an HTTP/1.1 client served by the HTTP/2 proxy; `h1upstream.py`: an HTTP/2
request sent to an HTTP/1.1 upstream), as Envoy's codecs translate them: `Host` ↔
`:authority`, the request line ↔ `:method`/`:path`, the status line ↔ `:status`; hop-by-hop
headers never cross (`Connection`, `Transfer-Encoding`, `Keep-Alive`, `Upgrade`…, and whatever
`Connection` names); a body without a known length is chunked on HTTP/1.1, DATA frames on HTTP/2;
trailers are chunked trailers on HTTP/1.1 (to a client that asked with `TE: trailers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

from nodeagent.http.headers import HOP_BY_HOP

Headers = list[tuple[bytes, bytes]]
_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
# Responses that never have a body (RFC 9110 §6.4.1): no framing header is added to them.
_BODILESS_STATUS = frozenset({204, 304})


def _connection_named(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a `Connection` header lists (hop-by-hop too, RFC 9110 §7.6.1)."""
    named: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return frozenset(named)


def _end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Lower-case names; no hop-by-hop header, no pseudo-header, no `Host`."""
    named = _connection_named(headers)
    out: Headers = []
    for k, v in headers:
        name = k.lower()
        if name.startswith(b":") or name in _HOP or name in named or name == b"host":
            continue
        out.append((name, v))
    return out


def wants_trailers(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """The client said it accepts trailers (`TE: trailers`, RFC 9110 §10.1.4)."""
    for k, v in headers:
        if k.lower() == b"te" and b"trailers" in [t.strip().lower() for t in v.split(b",")]:
            return True
    return False


def h2_request_of_http1(
    method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], *, scheme: str
) -> Headers:
    """An HTTP/1.1 request head as HTTP/2 header fields: `:authority` from an absolute-form
    target or `Host`, `te: trailers` kept (gRPC needs it), `content-length` kept (the body's
    DATA frames add up to it)."""
    authority = next((v for k, v in headers if k.lower() == b"host"), b"")
    path = target
    if target.startswith((b"http://", b"https://")):  # absolute-form: it names the authority
        rest = target.split(b"://", 1)[1]
        authority, slash, tail = rest.partition(b"/")
        path = slash + tail if slash else b"/"
    out: Headers = [
        (b":method", method),
        (b":scheme", scheme.encode()),
        (b":authority", authority),
        (b":path", path),
    ]
    if wants_trailers(headers):
        out.append((b"te", b"trailers"))
    out += _end_to_end(headers)
    return out


def http1_request_of_h2(
    headers: Sequence[tuple[bytes, bytes]], *, has_body: bool, content_length: bytes | None
) -> tuple[bytes, bytes, Headers, bool]:
    """HTTP/2 request header fields as an HTTP/1.1 request head: (method, target, headers,
    chunked). `Host` first, from `:authority`; a body of unknown length is chunked (then
    request trailers can follow it); `te: trailers` stays."""
    pseudo = {k: v for k, v in headers if k.startswith(b":")}
    out: Headers = [(b"host", pseudo.get(b":authority", b""))]
    if wants_trailers(headers):
        out.append((b"te", b"trailers"))
    out += [(k, v) for k, v in _end_to_end(headers) if k != b"content-length"]
    chunked = False
    if content_length is not None:
        out.append((b"content-length", content_length))
    elif has_body:
        out.append((b"transfer-encoding", b"chunked"))
        chunked = True
    return pseudo.get(b":method", b"GET"), pseudo.get(b":path", b"/"), out, chunked


def h2_response_of_http1(status: int, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """An HTTP/1.1 response head as HTTP/2 header fields (`content-length` kept)."""
    return [(b":status", str(status).encode()), *_end_to_end(headers)]


def http1_response_of_h2(
    headers: Sequence[tuple[bytes, bytes]], *, end_stream: bool, head_request: bool
) -> tuple[int, Headers]:
    """HTTP/2 response header fields as an HTTP/1.1 status and head. A response that ends with
    its head gets `content-length: 0` (none is needed for 204, 304 or a HEAD's answer); one
    without a length is left without framing headers: h11 chunks it for an HTTP/1.1 client
    (close-delimited for HTTP/1.0)."""
    status = 0
    for k, v in headers:
        if k == b":status":
            status = int(v) if v.isdigit() else 0
    out = _end_to_end(headers)
    known = any(k == b"content-length" for k, _ in out)
    if end_stream and not known and not head_request and status not in _BODILESS_STATUS:
        out.append((b"content-length", b"0"))
    return status, out


def has_length(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-length" for k, _ in headers)


def reason_phrase(status: int) -> bytes:
    """The status line's reason for an HTTP/1.1 answer made from an HTTP/2 one (which has
    none): the standard phrase, as Envoy writes it (some clients, h2load among them, do not
    count a status whose reason is empty)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
