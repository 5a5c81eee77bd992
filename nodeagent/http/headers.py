"""Header rewriting, pure (no I/O): the upstream request head, the response's headers, request ids.

What goes upstream is always re-serialised from the parsed request: hop-by-hop headers (RFC 9110
§7.6.1) and those the `connection` header names are dropped, `x-forwarded-for`/`-proto` and
`x-request-id` are set by this hop, the route's header operations apply, and the framing is the
one `downstream.py` validated (one `content-length`, or `transfer-encoding: chunked`), never a copy
of what the client sent.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import h11

from nodeagent.routing import HeaderOps, HttpRequest, RouteDecision
from nodeagent.telemetry.tracing import TRACE_HEADERS

# Hop-by-hop headers are never forwarded; h11 writes framing itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_HOP_BY_HOP_BYTES = frozenset(n.encode() for n in HOP_BY_HOP)
_SET_BY_THIS_HOP = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-request-id"})


def decode(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """h11's (already lower-cased) header pairs as text."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def joined(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Name → value, repeated names joined with ", " (RFC 9110 §5.3)."""
    out: dict[str, str] = {}
    for k, v in headers:
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def is_upgrade(request: HttpRequest) -> bool:
    """An Upgrade (WebSocket) request: `upgrade` named by `connection`."""
    return (
        "upgrade" in request.headers and "upgrade" in request.headers.get("connection", "").lower()
    )


def upstream_head(
    request: HttpRequest,
    headers: list[tuple[str, str]],
    decision: RouteDecision,
    *,
    request_id: str,
    trace_headers: list[tuple[str, str]],
    client_address: str | None,
    upgrade: bool,
) -> h11.Request:
    """The request head this hop sends upstream (`headers`: the client's, in order)."""
    joined_ = request.headers
    out = [("host", decision.authority or request.authority)]
    out += forwarded_headers(
        request,
        headers,
        request_id=request_id,
        trace_headers=trace_headers,
        client_address=client_address,
    )
    out = decision.request_headers.apply(out)
    if "content-length" in joined_:
        out.append(("content-length", joined_["content-length"]))
    elif "chunked" in joined_.get("transfer-encoding", "").lower():
        out.append(("transfer-encoding", "chunked"))
    if upgrade:
        out.append(("connection", "upgrade"))
        out.append(("upgrade", joined_.get("upgrade", "")))
    rewritten = decision.path != request.target or out[0][1] != request.authority
    if decision.request_headers or rewritten:
        # A value from the configuration (a rewrite, a header operation): h11 validates it.
        return h11.Request(method=request.method, target=decision.path, headers=out)
    # Everything else came from the head h11 parsed (and validated) or was made by this hop
    # (ids, trace context, the client's address): h11's second validation is skipped
    # (`_parsed`: a measurable share of the CPU per request).
    return h11.Request(
        method=request.method.encode("latin-1"),
        target=request.target.encode("latin-1"),
        headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in out],
        _parsed=True,
    )


def forwarded_headers(
    request: HttpRequest,
    headers: list[tuple[str, str]],
    *,
    request_id: str,
    trace_headers: list[tuple[str, str]],
    client_address: str | None,
) -> list[tuple[str, str]]:
    """The request's headers as this hop forwards them, for HTTP/1.1 and HTTP/2 alike: no
    Host, framing or hop-by-hop header; this hop's forwarding headers and span (the route's
    header operations are the caller's to apply)."""
    joined_ = request.headers
    named_by_connection = {
        n.strip().lower() for n in joined_.get("connection", "").split(",") if n.strip()
    }
    out: list[tuple[str, str]] = []
    for k, v in headers:
        if k == "host" or k in HOP_BY_HOP or k in named_by_connection:
            continue
        if k in _SET_BY_THIS_HOP or k == "content-length":
            continue
        if trace_headers and k.encode("latin-1") in TRACE_HEADERS:
            continue  # replaced by this hop's span context below
        out.append((k, v))
    out.extend(trace_headers)
    xff = joined_.get("x-forwarded-for")
    if client_address:
        xff = f"{xff}, {client_address}" if xff else client_address
    if xff:
        out.append(("x-forwarded-for", xff))
    out.append(("x-forwarded-proto", joined_.get("x-forwarded-proto", request.scheme)))
    out.append(("x-request-id", request_id))
    return out


def response_headers(
    response: h11.Response | h11.InformationalResponse, ops: HeaderOps
) -> list[tuple[str, str]]:
    """The upstream response's headers as the client gets them (hop-by-hop dropped, the
    route's response header operations applied)."""
    hdrs = [(k, v) for k, v in decode(list(response.headers)) if k not in HOP_BY_HOP]
    return ops.apply(hdrs)


def response_head(response: h11.Response, ops: HeaderOps, *, close: bool = False) -> h11.Response:
    """The client's response head: the upstream's status, reason and headers
    (`response_headers`), with `connection: close` when `close`. Without header operations the
    upstream's header bytes, which h11 already validated when it parsed them, go on as they
    are (`_parsed`: h11 skips its second validation, a measurable share of the CPU per
    request)."""
    if ops:
        hdrs = response_headers(response, ops)
        if close:
            hdrs.append(("connection", "close"))
        return h11.Response(status_code=response.status_code, headers=hdrs, reason=response.reason)
    kept = [(k, v) for k, v in response.headers if k not in _HOP_BY_HOP_BYTES]
    if close:
        kept.append((b"connection", b"close"))
    return h11.Response(
        status_code=response.status_code, headers=kept, reason=response.reason, _parsed=True
    )


def head_size(req: h11.Request) -> int:
    """A parsed head's size, about as it came on the wire (h11 bounds only an incomplete head;
    one that arrived whole in a read is measured with this)."""
    return len(req.target) + sum(len(k) + len(v) + 4 for k, v in req.headers)


def new_request_id() -> str:
    """A random (version 4) UUID for x-request-id, as Envoy makes one. From `random`, not
    `os.urandom` as `uuid.uuid4()` (a syscall per request): an id must be unique, not secret."""
    n = (
        (random.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48))
        | (0x4000 << 64)
        | (0x8000 << 48)
    )
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# Set only by the destination agent from the tunnel's verified certificates: a client's own copy
# is dropped (Envoy's SANITIZE_SET), so the app can trust the one it sees.
XFCC = "x-forwarded-client-cert"


def destination_head(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    *,
    xfcc: str | None,
    remove: frozenset[str] = frozenset(),
    add: Sequence[tuple[str, str]] = (),
    strip_params: frozenset[str] = frozenset(),
    trace_headers: Sequence[tuple[str, str]] = (),
    upgrade: bool = False,
) -> h11.Request:
    """The head the destination agent sends to its own app: the request as the source agent
    sent it (routing, rewrites and forwarding headers already applied there), hop-by-hop
    headers dropped, the client's `x-forwarded-client-cert` replaced by `xfcc` (None: none),
    the authentication's header changes (`remove`, `add`) and query-parameter removals
    applied, the trace headers replaced by this hop's SERVER span context, and the framing
    `downstream.py` validated."""
    joined_ = joined(headers)
    named_by_connection = {
        n.strip().lower() for n in joined_.get("connection", "").split(",") if n.strip()
    }
    out: list[tuple[str, str]] = []
    for k, v in headers:
        if k in HOP_BY_HOP or k in named_by_connection or k == "content-length" or k == XFCC:
            continue
        if k in remove:
            continue
        if trace_headers and k.encode("latin-1") in TRACE_HEADERS:
            continue
        out.append((k, v))
    out.extend(trace_headers)
    out.extend(add)
    if xfcc is not None:
        out.append((XFCC, xfcc))
    if "content-length" in joined_:
        out.append(("content-length", joined_["content-length"]))
    elif "chunked" in joined_.get("transfer-encoding", "").lower():
        out.append(("transfer-encoding", "chunked"))
    if upgrade:
        out.append(("connection", "upgrade"))
        out.append(("upgrade", joined_.get("upgrade", "")))
    if strip_params:
        target = without_params(target, strip_params)
    return h11.Request(method=method, target=target, headers=out)


def without_params(target: str, names: frozenset[str]) -> str:
    """`target` without the query parameters `names` (a token passed in `?access_token=`)."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept = [p for p in query.split("&") if p and p.partition("=")[0] not in names]
    return f"{path}?{'&'.join(kept)}" if kept else path


def xfcc_value(by: str, uri: str, certificate: bytes) -> str:
    """Istio's `x-forwarded-client-cert` for a request that arrived over mTLS: this workload
    (`By`), the hash of the client's certificate (DER, SHA-256, hex) and its SPIFFE id."""
    digest = hashlib.sha256(certificate).hexdigest()
    return f'By={by};Hash={digest};Subject="";URI={uri}'
