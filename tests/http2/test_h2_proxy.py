"""H2Proxy on loopback: real sockets, in-process HTTP/2 backends, the real curl
(--http2-prior-knowledge) and this package's own client connection as clients."""

from __future__ import annotations

from collections import Counter

import h2.errors
import trio
import trio.testing
from h2_helpers import HOST, H2Backend, app_snapshot, curl_h2, dr, echo, running, vs

from nodeagent.balance import Registry
from nodeagent.http.limits import Limits
from nodeagent.http2.conn import H2Connection, StreamReset
from nodeagent.telemetry.tracing import Tracer

GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


async def h2_requests(
    port: int, n: int, headers: list[tuple[str, str]] = (), path: str = "/pkg.Svc/Call"
) -> list[tuple[dict[str, str], bytes, dict[str, str]]]:
    """`n` requests, all on one client HTTP/2 connection (as one gRPC channel): per request
    (response head, body, trailers)."""
    out = []
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    conn = H2Connection(transport, client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        for _ in range(n):
            head = [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", HOST.encode()),
                (b":path", path.encode()),
                *((k.encode(), v.encode()) for k, v in headers),
            ]
            stream = conn.open_stream(head)
            await stream.send_data(b"hello", end_stream=True)
            got = {k.decode(): v.decode() for k, v in await stream.wait_headers()}
            body = b""
            while chunk := await stream.receive_data():
                body += chunk
            trailers = {k.decode(): v.decode() for k, v in stream.trailers or []}
            stream.close()
            out.append((got, body, trailers))
        nursery.cancel_scope.cancel()
    return out


async def test_one_client_connection_is_spread_over_the_replicas() -> None:
    # Round robin, so that the count is exact (peak EWMA follows the in-process backends'
    # latency noise; the sandbox test measures it across pods).
    backends = [H2Backend("a"), H2Backend("b"), H2Backend("c")]
    rr = dr({"trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}})
    async with running(app_snapshot(rr), backends) as r:
        got = await h2_requests(r.port, 300, GRPC)
    by = Counter(h["x-backend"] for h, _, _ in got)
    assert by == {"a": 100, "b": 100, "c": 100}
    assert all(b == b"hello" and t.get("x-trailer") == "yes" for _, b, t in got)
    # pooled: one upstream connection per replica for all 300 requests
    assert [b.connections for b in backends] == [1, 1, 1]
    assert all(e.protocol == "grpc" and e.grpc_status == 0 for e in r.logs)


async def test_curl_prior_knowledge_gets_the_answer_and_trailers() -> None:
    async with running(app_snapshot(replicas=1), [H2Backend("a")]) as r:
        code, out, err = await curl_h2(r.port, "/hello", "-i")
    assert code == 0, err
    assert out.startswith("HTTP/2 200")
    assert "x-backend: a" in out
    assert "a /hello" in out
    assert r.logs[-1].code == 200
    assert r.logs[-1].protocol == "http"


async def test_unavailable_is_retried_on_another_replica() -> None:
    async def flaky(backend: H2Backend, stream, headers, body) -> None:  # type: ignore[no-untyped-def]
        status = b"14" if backend.name == "bad" else b"0"
        stream.send_headers(
            [(b":status", b"200"), (b"content-type", b"application/grpc"),
             (b"grpc-status", status), (b"x-backend", backend.name.encode())],
            end_stream=True,
        )  # fmt: skip

    backends = [H2Backend("bad", flaky), H2Backend("good", flaky)]
    async with running(app_snapshot(replicas=2), backends) as r:
        got = await h2_requests(r.port, 40, GRPC)
    assert all(h["grpc-status"] == "0" for h, _, _ in got)
    retried = [e for e in r.logs if e.attempts > 1]
    assert retried, "some first attempts went to the UNAVAILABLE replica"
    assert all(e.grpc_status == 0 for e in r.logs)


async def test_header_match_on_a_grpc_method_routes_to_a_subset() -> None:
    route = vs(
        [
            {
                "match": [
                    {"uri": {"exact": "/pkg.Svc/Call"}, "headers": {"x-user": {"exact": "j"}}}
                ],
                "route": [{"destination": {"host": "app", "subset": "v2"}}],
            },
            {"route": [{"destination": {"host": "app", "subset": "v1"}}]},
        ]
    )
    rule = dr({"subsets": [{"name": "v1", "labels": {"version": "v1"}},
                           {"name": "v2", "labels": {"version": "v2"}}]})  # fmt: skip
    async with running(
        app_snapshot(route, rule, replicas=2), [H2Backend("a"), H2Backend("b")]
    ) as r:
        jason = await h2_requests(r.port, 20, [*GRPC, ("x-user", "j")])
        other = await h2_requests(r.port, 20, GRPC)
        other_method = await h2_requests(r.port, 5, [*GRPC, ("x-user", "j")], path="/pkg.Svc/Other")
    assert {h["x-backend"] for h, _, _ in jason} == {"b"}
    assert {h["x-backend"] for h, _, _ in other} == {"a"}
    assert {h["x-backend"] for h, _, _ in other_method} == {"a"}


async def test_grpc_abort_fault_is_a_trailers_only_grpc_error() -> None:
    route = vs([{"fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 50}}},
                 "route": [{"destination": {"host": "app"}}]}])  # fmt: skip
    async with running(app_snapshot(route, replicas=1), [H2Backend("a")]) as r:
        got = await h2_requests(r.port, 400, GRPC)
    aborted = [h for h, _, _ in got if h.get("grpc-status") == "14"]
    assert all(h[":status"] == "200" for h, _, _ in got)
    # binomial(400, 0.5): mean 200, sd 10; ±5 sd
    assert 150 <= len(aborted) <= 250, len(aborted)
    assert sum("FI" in e.flags for e in r.logs) == len(aborted)


async def test_route_timeout_gives_deadline_exceeded_to_a_grpc_client() -> None:
    route = vs([{"timeout": "0.5s", "route": [{"destination": {"host": "app"}}]}])
    async with running(app_snapshot(route, replicas=1), [H2Backend("a")]) as r:
        (got,) = await h2_requests(r.port, 1, [*GRPC, ("x-sleep", "3")])
    head, _, _ = got
    assert head[":status"] == "200"
    assert head["grpc-status"] == "4"
    assert "UT" in r.logs[-1].flags
    assert r.logs[-1].grpc_status == 4


async def test_grpc_timeout_header_bounds_the_request() -> None:
    async with running(app_snapshot(replicas=1), [H2Backend("a")]) as r:
        (got,) = await h2_requests(r.port, 1, [*GRPC, ("x-sleep", "3"), ("grpc-timeout", "300m")])
    assert got[0]["grpc-status"] == "4"


async def test_no_route_for_a_grpc_request_is_unimplemented() -> None:
    route = vs(
        [{"match": [{"uri": {"prefix": "/only"}}], "route": [{"destination": {"host": "app"}}]}]
    )
    async with running(app_snapshot(route, replicas=1), [H2Backend("a")]) as r:
        (got,) = await h2_requests(r.port, 1, GRPC)
    assert got[0][":status"] == "200"
    assert got[0]["grpc-status"] == "12"
    assert r.logs[-1].flags == ["NR"]


async def drip(backend: H2Backend, stream, headers, body) -> None:  # type: ignore[no-untyped-def]
    """A server stream: 10 messages 0.2 s apart, then OK in the trailers."""
    stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
    for i in range(10):
        await stream.send_data(f"m{i}".encode())
        await trio.sleep(0.2)
    stream.send_trailers([(b"grpc-status", b"0")])


async def test_a_stream_without_a_route_timeout_is_not_cut() -> None:
    async with running(app_snapshot(replicas=1), [H2Backend("a", drip)]) as r:
        ((_head, body, trailers),) = await h2_requests(r.port, 1, GRPC)
    assert body == b"".join(f"m{i}".encode() for i in range(10))
    assert trailers == {"grpc-status": "0"}
    assert r.logs[-1].grpc_status == 0


async def test_a_route_timeout_bounds_the_whole_stream() -> None:
    # Envoy's route timeout covers the response to its end: a stream that outlives it is ended
    # with DEADLINE_EXCEEDED in the trailers (its head and first messages already went out).
    route = vs([{"timeout": "0.7s", "route": [{"destination": {"host": "app"}}]}])
    async with running(app_snapshot(route, replicas=1), [H2Backend("a", drip)]) as r:
        ((head, body, trailers),) = await h2_requests(r.port, 1, GRPC)
    assert head[":status"] == "200"
    assert body.startswith(b"m0m1")
    assert len(body) < 20
    assert trailers["grpc-status"] == "4"
    assert "UT" in r.logs[-1].flags


async def test_http2_max_requests_overflow_is_a_grpc_unavailable() -> None:
    limit = dr({"trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 1}}}})
    async with running(app_snapshot(limit, replicas=1), [H2Backend("a")]) as r:
        results: list[dict[str, str]] = []

        async def one() -> None:
            ((head, _, _),) = await h2_requests(r.port, 1, [*GRPC, ("x-sleep", "0.5")])
            results.append(head)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
    statuses = sorted(h.get("grpc-status", "") for h in results)
    assert statuses == ["", "14", "14"], results  # one served (status in its trailers)
    assert sum("UO" in e.flags for e in r.logs) == 2


async def answer_then_reset(backend: H2Backend, stream, headers, body) -> None:  # type: ignore[no-untyped-def]
    """As nginx: the whole answer before reading the request, then RST_STREAM(NO_ERROR)."""
    stream.send_headers([(b":status", b"200"), (b"x-backend", backend.name.encode())])
    # no checkpoint in between: head, body, END_STREAM and the reset leave in one write
    stream.conn.h2.send_data(stream.id, b"early", end_stream=True)
    stream.reset(h2.errors.ErrorCodes.NO_ERROR)
    await trio.lowlevel.checkpoint()


async def test_a_complete_answer_survives_the_servers_no_error_reset() -> None:
    async with running(app_snapshot(replicas=1), [H2Backend("a", answer_then_reset)]) as r:
        transport = await trio.open_tcp_stream("127.0.0.1", r.port)
        conn = H2Connection(transport, client=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", HOST.encode()),
                    (b":path", b"/upload"), (b"x-stream", b"1")]  # fmt: skip
            stream = conn.open_stream(head)  # the request body stays open
            await stream.send_data(b"part")
            got = await stream.wait_headers()
            body = b""
            while chunk := await stream.receive_data():
                body += chunk
            nursery.cancel_scope.cancel()
    assert (dict(got)[b":status"], body) == (b"200", b"early")
    assert r.logs[-1].code == 200
    assert "UR" not in r.logs[-1].flags


async def flood(backend: H2Backend, stream, headers, body) -> None:  # type: ignore[no-untyped-def]
    """A server stream that sends as fast as the windows let it, until the proxy resets it (the
    client's reset reaching the upstream is the point; which send sees it is timing)."""
    stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
    try:
        for _ in range(2000):
            await stream.send_data(b"x" * 16384)
    except StreamReset:
        return
    stream.send_trailers([(b"grpc-status", b"0")])


async def test_a_client_reset_mid_stream_ends_only_that_request() -> None:
    async with running(app_snapshot(replicas=1), [H2Backend("a", flood)]) as r:
        for _ in range(5):
            transport = await trio.open_tcp_stream("127.0.0.1", r.port)
            conn = H2Connection(transport, client=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.run)
                head = [(b":method", b"POST"), (b":scheme", b"http"),
                        (b":authority", HOST.encode()), (b":path", b"/pkg.Svc/Flood"),
                        (b"content-type", b"application/grpc")]  # fmt: skip
                stream = conn.open_stream(head, end_stream=True)
                await stream.wait_headers()
                assert await stream.receive_data()
                stream.reset()  # the client gives up mid-stream…
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()  # …and its connection goes too
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert len(r.logs) == 5
        assert all("DC" in e.flags for e in r.logs), r.logs
        # the proxy still serves: a reset ends one stream, never the proxy
        r.backends["10.0.0.1"].handler = echo
        got = await h2_requests(r.port, 1, GRPC)
    assert got[0][0][":status"] == "200"


async def test_stream_idle_timeout_cuts_silence_not_a_slow_stream() -> None:
    limits = Limits(stream_idle_timeout=0.5)
    backends = [H2Backend("a", drip)]
    async with running(app_snapshot(replicas=1), backends, limits=limits) as r:
        ((_, body, trailers),) = await h2_requests(r.port, 1, GRPC)  # a message every 0.2 s
        assert trailers == {"grpc-status": "0"}
        assert len(body) == 20
        r.backends["10.0.0.1"].handler = echo
        ((head, _, _),) = await h2_requests(r.port, 1, [*GRPC, ("x-sleep", "3")])  # silence
    assert head[":status"] == "200"
    assert head["grpc-status"] == "2"  # Envoy's 408 → UNKNOWN
    assert r.logs[-1].flags == ["SI"]


async def test_grpc_status_in_trailers_counts_for_outlier_detection() -> None:
    async def late_failure(backend: H2Backend, stream, headers, body) -> None:  # type: ignore[no-untyped-def]
        # a message first, then the status: nothing to retry, but the replica is failing
        stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc"),
                             (b"x-backend", backend.name.encode())])  # fmt: skip
        await stream.send_data(b"partial")
        status = b"14" if backend.name == "bad" else b"0"
        stream.send_trailers([(b"grpc-status", status)])

    od = {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "60s",
          "maxEjectionPercent": 100}  # fmt: skip
    rule = dr(
        {"trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}, "outlierDetection": od}}
    )
    backends = [H2Backend("bad", late_failure), H2Backend("good", late_failure)]
    async with running(app_snapshot(rule, replicas=2), backends) as r:
        got = await h2_requests(r.port, 30, GRPC)
    by = Counter(h["x-backend"] for h, _, _ in got)
    assert by["bad"] == 3, by  # ejected at its third consecutive UNAVAILABLE
    assert sum(t["grpc-status"] == "14" for _, _, t in got) == 3


async def test_a_traced_request_continues_the_callers_trace_upstream() -> None:
    tracer = Tracer("node-1", sample_rate=1.0)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    backends = [H2Backend("a")]
    async with running(app_snapshot(replicas=1), backends, tracer=tracer) as r:
        await h2_requests(r.port, 1, [*GRPC, ("traceparent", parent)])
    seen = backends[0].seen[-1]
    sent = seen["traceparent"].split("-")
    assert sent[1] == "0af7651916cd43dd8448eb211c80319c"  # the same trace
    assert sent[2] != "b7ad6b7169203331"  # a new span: this hop's
    assert r.logs[-1].trace_id == "0af7651916cd43dd8448eb211c80319c"


async def test_a_mirrored_copy_goes_to_the_shadow_host() -> None:
    route = vs([{"route": [{"destination": {"host": "app", "subset": "v1"}}],
                 "mirror": {"host": "app", "subset": "v2"}}])  # fmt: skip
    rule = dr({"subsets": [{"name": "v1", "labels": {"version": "v1"}},
                           {"name": "v2", "labels": {"version": "v2"}}]})  # fmt: skip
    backends = [H2Backend("a"), H2Backend("b")]
    async with running(app_snapshot(route, rule, replicas=2), backends) as r:
        got = await h2_requests(r.port, 3, GRPC)
        with trio.fail_after(5):  # the copies are sent beside the answers
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert {h["x-backend"] for h, _, _ in got} == {"a"}
    assert {s[":authority"] for s in backends[1].seen} == {"app.default.svc.cluster.local-shadow"}
    assert r.proxy.statistics()["mirrored"] == 3


async def test_an_idle_client_connection_gets_a_goaway() -> None:
    async with running(
        app_snapshot(replicas=1), [H2Backend("a")], limits=Limits(idle_timeout=0.3)
    ) as r:
        transport = await trio.open_tcp_stream("127.0.0.1", r.port)
        conn = H2Connection(transport, client=True)
        with trio.fail_after(5):
            await conn.run()  # returns once the proxy said GOAWAY and closed
        assert conn.goaway


async def test_max_requests_per_connection_and_max_connections() -> None:
    per_conn = dr({"trafficPolicy": {"connectionPool": {"http": {"maxRequestsPerConnection": 2}}}})
    backends = [H2Backend("a")]
    async with running(app_snapshot(per_conn, replicas=1), backends) as r:
        got = await h2_requests(r.port, 5, GRPC)
    assert all(h[":status"] == "200" for h, _, _ in got)
    assert backends[0].connections == 3  # 2 + 2 + 1 requests

    # One connection of one stream, and a pending queue of one (as Envoy, the HTTP/2 pool has
    # one): the second call waits for the first's stream, the third is refused.
    pool = {
        "tcp": {"maxConnections": 1},
        "http": {"maxConcurrentStreams": 1, "http1MaxPendingRequests": 1},
    }
    one = dr({"trafficPolicy": {"connectionPool": pool}})
    async with running(app_snapshot(one, replicas=1), [H2Backend("a")]) as r:
        results: list[dict[str, str]] = []

        async def slow_call() -> None:
            ((head, _, _),) = await h2_requests(r.port, 1, [*GRPC, ("x-sleep", "0.5")])
            results.append(head)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_call)
            await trio.sleep(0.1)  # the first call holds the one connection's one stream
            nursery.start_soon(slow_call)
            await trio.sleep(0.1)  # the second waits in the pending queue
            nursery.start_soon(slow_call)
        assert r.proxy.pool.stats.pending_waits == 1
    assert sorted(h.get("grpc-status", "") for h in results) == ["", "", "14"], results
    assert sum("UO" in e.flags for e in r.logs) == 1


async def test_a_second_pool_is_not_starved_by_the_firsts_connection() -> None:
    # Two source pods' proxies share the node's registry, so the cluster's breaker: the first
    # one's connection holds the one maxConnections slot. The second pool holds none of the
    # cluster's, so it opens one past the limit at once, rather than waiting in the pending
    # queue for a slot the first pool keeps (its connection stays open after the call).
    pool = {
        "tcp": {"maxConnections": 1},
        "http": {"maxConcurrentStreams": 1, "http1MaxPendingRequests": 1},
    }
    snap = app_snapshot(dr({"trafficPolicy": {"connectionPool": pool}}), replicas=1)
    registry = Registry(on_event=None)
    async with (
        running(snap, [H2Backend("a")], registry=registry) as first,
        running(snap, [H2Backend("b")], registry=registry) as second,
    ):
        ((head, _, _),) = await h2_requests(first.port, 1, GRPC)
        assert head.get("grpc-status", "") == ""
        t0 = trio.current_time()
        with trio.fail_after(5):
            ((head, _, _),) = await h2_requests(second.port, 1, GRPC)
        assert head.get("grpc-status", "") == "", head
        assert trio.current_time() - t0 < 1.0
        assert second.proxy.pool.stats.pending_waits == 0
        (picker,) = registry.pickers()
        assert picker.breaker.in_use("connections") == 2  # one per pool
