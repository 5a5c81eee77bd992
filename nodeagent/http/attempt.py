"""Where a retry is decided: pick an endpoint, respect the circuit breaker, try, retry.

`Attempts.run` tries a request on the endpoints the cluster's balancer picks until one answers
with a response the route does not retry, the retry policy (VirtualService `retries`) or the
breaker's retry budget (`maxRetries`) says stop, or the route timeout passes. Each attempt is
bracketed for the balancer (`handle.start()` / `handle.finish(latency, outcome)`: peak-EWMA
latencies, outlier detection); a retry avoids the endpoint that just failed; an idle pooled
connection the server had closed meanwhile is retried once on a fresh one to the same endpoint,
not counted (idempotent methods, or a request that could not be written).

The result is either the `Outcome` holding the upstream response to stream to the client, or a
`LocalReply` (503 UH/UO/UF/UR, 504 UT, 403 denied) with the response flags set on the entry.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import h11
import trio

from nodeagent.balance import NoHealthyUpstream, Outcome, Overflow, PickContext
from nodeagent.balance import Picker as Cluster
from nodeagent.balance.pool import Token as BreakerToken
from nodeagent.balance.state import EndpointState
from nodeagent.http import flags
from nodeagent.http.downstream import RequestBody
from nodeagent.http.errors import DownstreamError, UpstreamDenied, UpstreamOverflow
from nodeagent.http.limits import Limits
from nodeagent.http.log import RequestLog
from nodeagent.http.origination import UpstreamTlsError
from nodeagent.http.pool import ConnectionPool, UpstreamConnection
from nodeagent.routing import RouteDecision
from nodeagent.routing.grpc import grpc_to_http_status
from nodeagent.snapshot.routes import RetryPolicy

DENIED_BODY = b"RBAC: access denied"
WATCH_AFTER = 0.05  # seconds without a response head before the client is watched for a close
_UPSTREAM_FAILED = (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError)
# Methods a server may see twice with the same effect (RFC 9110 §9.2.2): safe to send again
# after a pooled connection turned out closed.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
UNSENT = "the request could not be written whole"  # a reset's detail: the peer was gone


@dataclass(slots=True)
class AttemptOutcome:
    """How one attempt ended."""

    kind: Literal["response", "connect-failure", "reset", "timeout", "overflow", "denied"]
    up: UpstreamConnection | None = None
    response: h11.Response | h11.InformationalResponse | None = None
    stale: bool = False
    detail: str = ""
    tls_failure: str = ""  # TLS origination's transport failure reason (connect-failure)
    status: int = 0  # a response's status code
    grpc_status: int | None = None  # a gRPC response's status, when its head carries it
    # Seconds of the attempt spent opening a new upstream connection: not the endpoint's
    # response time, so not its latency sample (tower's balancer sees only ready connections).
    setup_s: float = 0.0
    # A response whose outcome is known only at its end (gRPC: `grpc-status` in the trailers):
    # the attempt asks for it with `defer_finish`; `_measured` then leaves the endpoint's
    # bracket open (in flight, the request slot held) and `finish(outcome or None)` closes it,
    # once, with the latency sample of the head. Whoever takes the outcome must call it.
    defer_finish: bool = False
    finish: Callable[[Outcome | None], None] | None = None


@dataclass(frozen=True, slots=True)
class LocalReply:
    """The request failed upstream: answer the client with this."""

    status: int
    body: bytes
    close: bool = False


class _NoScope:
    """Stands in for a cancel scope when there is no deadline (enter/exit do nothing); typed
    like one (`__exit__ -> bool`) so that code after the `with` stays reachable for mypy."""

    def __enter__(self) -> None:
        return None

    cancelled_caught = False  # as a CancelScope's: never, there is no deadline

    def __exit__(self, *exc: object) -> bool:
        return self.cancelled_caught


NO_SCOPE = _NoScope()


class Attempts:
    """The attempt loop of one proxy, over its upstream connection pool."""

    def __init__(self, pool: ConnectionPool, limits: Limits) -> None:
        self.pool = pool
        self.limits = limits

    async def run(
        self,
        cluster: Cluster,
        ctx: PickContext,
        head: h11.Request,
        body: RequestBody,
        decision: RouteDecision,
        entry: RequestLog,
        *,
        service_port: int,
        upgrade: bool,
    ) -> AttemptOutcome | LocalReply:
        async def attempt(handle: EndpointState, per_try_timeout: float | None) -> AttemptOutcome:
            return await self._attempt(cluster, handle, service_port, head, body, per_try_timeout)

        async def discard(outcome: AttemptOutcome) -> None:
            assert outcome.up is not None
            await self.pool.discard(outcome.up)

        return await run_attempts(
            cluster,
            ctx,
            decision,
            entry,
            attempt=attempt,
            replayable=lambda: body.replayable,
            discard=discard,
            upgrade=upgrade,
        )

    async def _attempt(
        self,
        cluster: Cluster,
        handle: EndpointState,
        service_port: int,
        head: h11.Request,
        body: RequestBody,
        per_try_timeout: float | None,
    ) -> AttemptOutcome:
        """One try on `handle`'s endpoint. A pooled idle connection the server had closed
        before any byte of the response (`stale`) is tried once more at once, on a fresh
        connection to the same endpoint, and not counted (Envoy's pool does the same): for an
        idempotent method, or when the request could not be written whole (the peer was gone,
        so it cannot have acted on it).
        Otherwise it is a reset like any other (the server may have acted on it)."""
        outcome = await self._try(cluster, handle, service_port, head, body, per_try_timeout)
        if outcome.stale:
            if body.replayable and may_resend(head.method, written=outcome.detail != UNSENT):
                return await self._try(
                    cluster, handle, service_port, head, body, per_try_timeout, fresh=True
                )
            outcome.stale = False
        return outcome

    async def _try(
        self,
        cluster: Cluster,
        handle: EndpointState,
        service_port: int,
        head: h11.Request,
        body: RequestBody,
        per_try_timeout: float | None,
        *,
        fresh: bool = False,
    ) -> AttemptOutcome:
        pool_limits = cluster.policy.pool
        # Opening a connection (and a wait in the pending queue) is the mesh's time, not the
        # endpoint's: peak-EWMA gets the latency without it, as from the HTTP/2 pool. With it,
        # a fast replica's first request (a new tunnel stream, maybe a TLS handshake) read as
        # slow, and the 10 s decay kept it so for the next seconds.
        acquiring = trio.current_time()
        try:
            up = await self.pool.acquire(
                handle.endpoint,
                service_port,
                fresh=fresh,
                breaker=cluster.breaker,
                connect_timeout=min(pool_limits.connect_timeout_s, self.limits.connect_timeout),
                idle_timeout=pool_limits.http_idle_timeout_s,
                tls=cluster.policy.tls,
                host=cluster.cluster.rsplit("|", 1)[-1],  # outbound|port|subset|host
            )
        except UpstreamOverflow as exc:
            return AttemptOutcome("overflow", detail=str(exc))
        except UpstreamDenied as exc:
            return AttemptOutcome("denied", detail=str(exc))
        except UpstreamTlsError as exc:
            return AttemptOutcome("connect-failure", detail=str(exc), tls_failure=exc.reason)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            return AttemptOutcome("connect-failure", detail=str(exc))
        setup = trio.current_time() - acquiring
        timed_out = True
        sent = False
        try:
            with trio.move_on_after(per_try_timeout) if per_try_timeout else NO_SCOPE:
                await body.stream_to(up, head)
                sent = True
                down = body.down
                head_event: h11.Response | h11.InformationalResponse | None = None
                # Most answers come at once: only one still awaited after WATCH_AFTER gets a
                # watch on the client (a task per request cost ~25% more CPU per request).
                # A client that closes meanwhile cancels the attempt (Envoy: code 0, flag DC)
                # and frees its upstream connection at once.
                with trio.move_on_after(WATCH_AFTER) as grace:
                    head_event = await _response_head(up)
                if grace.cancelled_caught:  # cancelled while waiting: nothing was lost
                    waiting = trio.CancelScope()
                    watch = down.watch_close(waiting.cancel)
                    try:
                        with waiting:
                            head_event = await _response_head(up)
                    finally:
                        watch.cancel()
                    if waiting.cancelled_caught:
                        raise DownstreamError("the client closed while its response was awaited")
                down.touch()
                if head_event is not None:
                    timed_out = False
                    return AttemptOutcome(
                        "response",
                        up=up,
                        response=head_event,
                        status=head_event.status_code,
                        setup_s=setup,
                    )
                timed_out = False
                await self.pool.discard(up)
                stale = up.reused and not up.received_any
                return AttemptOutcome("reset", stale=stale, setup_s=setup)
        except DownstreamError:
            await self.pool.discard(up)
            raise
        except _UPSTREAM_FAILED as exc:
            timed_out = False
            await self.pool.discard(up)
            stale = up.reused and not up.received_any
            detail = str(exc) if sent else UNSENT
            return AttemptOutcome("reset", stale=stale, detail=detail, setup_s=setup)
        finally:
            if timed_out:
                await self.pool.discard(up)
        return AttemptOutcome("timeout", setup_s=setup)


def may_resend(method: bytes, *, written: bool) -> bool:
    """Whether a request whose pooled connection turned out closed (nothing of a response
    came) may go again on a fresh one: an idempotent method, or one not written whole."""
    return method in IDEMPOTENT or not written


AttemptFn = Callable[[EndpointState, "float | None"], Awaitable[AttemptOutcome]]


async def run_attempts(
    cluster: Cluster,
    ctx: PickContext,
    decision: RouteDecision,
    entry: RequestLog,
    *,
    attempt: AttemptFn,
    replayable: Callable[[], bool],
    discard: Callable[[AttemptOutcome], Awaitable[None]],
    upgrade: bool = False,
    grpc_timeout: float | None = None,
) -> AttemptOutcome | LocalReply:
    """The retry decision, for every protocol: pick, try (`attempt(handle, per_try_timeout)`:
    one try on that endpoint, whatever the protocol), retry or stop. `replayable()` says the
    request can still be sent again; `discard(outcome)` drops a response that is retried.
    The route timeout bounds it all; a gRPC request's `grpc-timeout` too (the smaller wins)."""
    policy = decision.retries
    tries = 1 + (0 if upgrade else policy.attempts)
    limits = [t for t in (decision.timeout, grpc_timeout) if t is not None]
    deadline = trio.current_time() + min(limits) if limits else math.inf
    outcome: AttemptOutcome | None = None
    stale_retried = False
    held: list[BreakerToken] = []  # retry tokens (maxRetries), released when the request ends
    handle: EndpointState | None = None

    def may_retry() -> bool:
        token = cluster.breaker.try_acquire_retry()
        if isinstance(token, Overflow):
            return False  # retry budget spent: the last answer goes back as it is
        held.append(token)
        return True

    try:
        # A cancel scope costs an enter/exit per request: only when there is a deadline.
        overall = trio.CancelScope(deadline=deadline) if deadline != math.inf else None
        with overall if overall is not None else NO_SCOPE:
            tried = 0
            while tried < tries:
                try:
                    handle = cluster.pick(ctx, avoid=handle)
                except NoHealthyUpstream:
                    entry.flags.append(flags.NO_HEALTHY_UPSTREAM)
                    return LocalReply(503, b"no healthy upstream")
                endpoint = handle.endpoint
                entry.upstream = f"{endpoint.address}:{endpoint.port}"
                entry.attempts += 1
                outcome = await _measured(cluster, handle, attempt, policy.per_try_timeout)
                last = tried + 1 >= tries or not replayable()
                if outcome.stale and not stale_retried and replayable():
                    stale_retried = True  # an idle pooled connection the server had closed
                    entry.attempts -= 1
                    continue
                if outcome.kind == "response":
                    retriable = _retriable_response(policy, outcome)
                    if not last and retriable and not upgrade and may_retry():
                        if outcome.finish is not None:
                            outcome.finish(None)
                        await discard(outcome)
                        tried += 1
                        continue
                    if tried > 0 and retriable:
                        entry.flags.append(flags.UPSTREAM_RETRY_LIMIT)
                    return outcome
                kind = outcome.kind
                if kind == "overflow" or kind == "denied" or last:
                    break
                # Still stale: refused again, after the uncounted retry (`refused-stream` counts).
                if not policy.retriable_failure(kind, refused=outcome.stale) or not may_retry():
                    break
                tried += 1
    finally:
        for token in held:
            token.release()
    return _failure(outcome, entry, timed_out=overall is not None and overall.cancelled_caught)


def _retriable_response(policy: RetryPolicy, outcome: AttemptOutcome) -> bool:
    if outcome.grpc_status is not None and policy.retriable_grpc(outcome.grpc_status):
        return True
    return policy.retriable_status(outcome.status)


async def _measured(
    cluster: Cluster,
    handle: EndpointState,
    attempt: AttemptFn,
    per_try_timeout: float | None,
) -> AttemptOutcome:
    """One attempt, bracketed for the balancer: in flight from pick to response head; the
    latency and how it ended feed peak-EWMA and outlier detection."""
    request_token = cluster.breaker.try_acquire_request()
    if isinstance(request_token, Overflow):
        return AttemptOutcome("overflow", detail=str(request_token))
    handle.start()
    started = trio.current_time()
    result = Outcome.TIMEOUT  # a cancellation (route timeout) ends the attempt here
    setup = 0.0
    deferred = False
    try:
        outcome = await attempt(handle, per_try_timeout)
        result = _balance_outcome(outcome)
        setup = outcome.setup_s
        if outcome.kind == "response" and outcome.defer_finish:
            latency = trio.current_time() - started - setup
            done = [False]
            head_result = result

            def finish(final: Outcome | None) -> None:
                if not done[0]:
                    done[0] = True
                    handle.finish(latency, final or head_result)
                    request_token.release()

            outcome.finish = finish
            deferred = True
        return outcome
    except DownstreamError:
        result = Outcome.CANCELLED
        raise
    finally:
        if not deferred:
            handle.finish(trio.current_time() - started - setup, result)
            request_token.release()


async def _response_head(
    up: UpstreamConnection,
) -> h11.Response | h11.InformationalResponse | None:
    """The response head (a 101 included), None if the upstream closed first."""
    while True:
        event = await up.next_event()
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return event
            continue  # 100 Continue, 103 Early Hints: the client is not told
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 502)


def _failure(outcome: AttemptOutcome | None, entry: RequestLog, *, timed_out: bool) -> LocalReply:
    """What the client gets when no attempt produced a response to pass on."""
    if outcome is not None and outcome.kind == "denied":
        # The destination's authorization policy refused the tunnel: what Istio clients see.
        return LocalReply(403, DENIED_BODY)
    if timed_out or (outcome is not None and outcome.kind == "timeout"):
        entry.flags.append(flags.UPSTREAM_TIMEOUT)
        if entry.attempts > 1:
            entry.flags.append(flags.UPSTREAM_RETRY_LIMIT)
        return LocalReply(504, b"upstream request timeout", close=True)
    assert outcome is not None
    if entry.attempts > 1:
        entry.flags.append(flags.UPSTREAM_RETRY_LIMIT)
    if outcome.kind == "overflow":
        entry.flags.insert(0, flags.UPSTREAM_OVERFLOW)
        return LocalReply(503, b"upstream overflow")
    if outcome.kind == "connect-failure":
        entry.flags.insert(0, flags.UPSTREAM_CONNECT_FAILURE)
        reason = "connection failure"
        if outcome.tls_failure:
            # Envoy's body and %UPSTREAM_TRANSPORT_FAILURE_REASON% for a failed TLS handshake.
            entry.upstream_transport_failure_reason = outcome.tls_failure
            reason += f", transport failure reason: {outcome.tls_failure}"
    else:
        entry.flags.insert(0, flags.UPSTREAM_RESET)
        reason = "connection termination"
    msg = f"upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    return LocalReply(503, msg.encode())


def _balance_outcome(outcome: AttemptOutcome) -> Outcome:
    """How an attempt counts for outlier detection (Envoy: local-origin failures are 503s)."""
    if outcome.kind == "response":
        if outcome.grpc_status is not None:
            return Outcome.from_status(grpc_to_http_status(outcome.grpc_status))
        return Outcome.from_status(outcome.status)
    if outcome.kind == "connect-failure":
        return Outcome.CONNECT_FAILURE
    if outcome.kind == "timeout":
        return Outcome.TIMEOUT
    if outcome.kind == "reset" and not outcome.stale:
        return Outcome.GATEWAY_ERROR
    # overflow (a local limit), denied (policy, not health), stale (our idle connection)
    return Outcome.CANCELLED
