"""The guard's step of a proxy's request path, for both codecs (`HttpProxy` for HTTP/1.1
clients, `nodeagent.http2.H2Proxy` for HTTP/2 ones): ask the injected `Guard` (authentication,
L7 authorization) before routing; a refusal becomes a direct answer (flag UAEX), an allowed
request goes on with authentication's header and query changes (routes may match the claims it
copied to headers).
"""

from __future__ import annotations

import trio

from nodeagent.http import flags
from nodeagent.http.guard import GUARD_FAILED, Guard, RequestFacts, Verdict
from nodeagent.http.headers import joined, without_params
from nodeagent.http.log import RequestLog, log
from nodeagent.routing import DirectResponse, HttpRequest, RouteDecision

Fields = list[tuple[str, str]]


def local_address(client: trio.abc.Stream) -> str:
    """The address the client connected to (the guard's destination.ip), "" when unknown."""
    if isinstance(client, trio.SocketStream):
        try:
            return str(client.socket.getsockname()[0])
        except OSError:
            pass
    return ""


async def ask_guard(guard: Guard, facts: RequestFacts, entry: RequestLog) -> Verdict:
    """The guard's verdict on one request, recorded on its log entry; a guard that raised
    refuses (never lets the request through unchecked)."""
    try:
        verdict = await guard(facts)
    except Exception as exc:
        log.error("request.guard_failed", path=entry.path, error=repr(exc))
        verdict = GUARD_FAILED
    entry.request_principal = verdict.request_principal or ""
    if not verdict.allowed:
        entry.flags.append(flags.UNAUTHORIZED)
        entry.response_code_details = verdict.details
        entry.policy = verdict.policy or ""
    return verdict


async def guard_request(
    guard: Guard,
    request: HttpRequest,
    headers: Fields,
    entry: RequestLog,
    *,
    port: int,
    source_ip: str,
    destination_ip: str,
) -> tuple[HttpRequest, Fields, RouteDecision | None]:
    """(the request as routed, its headers, a refusal to answer instead or None)."""
    facts = RequestFacts(
        method=request.method,
        target=request.target,
        host=request.authority,
        headers=headers,
        port=port,
        source_ip=source_ip,
        destination_ip=destination_ip,
        source_identity=None,
        mtls=False,
    )
    verdict = await ask_guard(guard, facts, entry)
    if not verdict.allowed:
        refusal = RouteDecision(kind="direct", direct=DirectResponse(verdict.status, verdict.body))
        return request, headers, refusal
    if not (verdict.remove_headers or verdict.add_headers or verdict.strip_params):
        return request, headers, None
    headers = [(k, v) for k, v in headers if k not in verdict.remove_headers]
    headers += verdict.add_headers
    target = request.target
    if verdict.strip_params:
        target = without_params(target, verdict.strip_params)
    changed = HttpRequest.from_target(
        request.method,
        request.authority,
        target,
        joined(headers),
        port=request.port,
        host=request.host,
        scheme=request.scheme,
    )
    return changed, headers, None
