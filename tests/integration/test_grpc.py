"""HTTP/2 and gRPC through two agents on a 2-node sandbox: real grpcio servers on n2's pods, a
real grpcio client (one channel) in a pod on n1, curl --http2-prior-knowledge and h2load.
Per-request balancing over one channel, latency-aware balancing, UNAVAILABLE retried then
ejected, header routing on a gRPC method to a subset, abort.grpcStatus at 50%, a route timeout
as DEADLINE_EXCEEDED, server streaming and a bidirectional echo intact, metrics per status."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from grpc_apps import PY, client, unary, write_apps
from l7_helpers import binomial_interval, write_app
from mesh_helpers import apply, eventually, sandbox_fixture
from snapshot_docs import destination_rule, service

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("gr")
ECHO, LAT, EJ, FAULT, WEB, ECHO_RR, S_H1, S_H2, S_TCP, AGED = (
    f"10.96.83.{i}" for i in range(10, 20)
)


def grpc_service(name: str, ip: str, port_name: str = "grpc") -> dict[str, Any]:
    return service(name, cluster_ip=ip, port_name=port_name)


def vs(host: str, http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": host, "namespace": "default"},
        "spec": {"hosts": [host], "http": http},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grpc")


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    apps = write_apps(files)
    server = [PY, str(apps["grpc_server"])]
    out = {"client": sandbox.pod_add("n1", "default", "client", ["sleep", "3600"])}

    def add(name: str, labels: dict[str, str], delay_ms: int = 0, *extra: str) -> None:
        out[name] = sandbox.pod_add(
            "n2", "default", name, [*server, name, str(delay_ms), *extra], labels=labels
        )

    for i in (1, 2, 3):
        add(f"echo-{i}", {"app": "echo", "version": f"v{i}"})
        add(f"ej-{i}", {"app": "ej"})
    add("lat-1", {"app": "lat"})
    add("lat-2", {"app": "lat"})
    add("lat-3", {"app": "lat"}, delay_ms=25)
    add("fault-1", {"app": "fault"})
    add("aged-1", {"app": "aged"}, 20, "300")  # 20 ms per call, GOAWAY at 300 ms of age
    for name, cmd in (
        ("s-h1", [*write_app(files), "s-h1"]),
        ("s-h2", [PY, str(apps["h2_server"]), "s-h2"]),
        ("s-tcp", [PY, str(apps["banner"])]),
    ):
        out[name] = sandbox.pod_add("n2", "default", name, cmd, labels={"app": name})
    for i in (1, 2):
        out[f"web-{i}"] = sandbox.pod_add(
            "n2",
            "default",
            f"web-{i}",
            [PY, str(apps["h2_server"]), f"web-{i}"],
            labels={"app": "web"},
        )
    od = {
        "consecutive5xxErrors": 3,
        "interval": "1s",
        "baseEjectionTime": "60s",
        "maxEjectionPercent": 100,
    }
    subsets = [{"name": f"v{i}", "labels": {"version": f"v{i}"}} for i in (1, 2, 3)]
    docs = [
        grpc_service("echo", ECHO),
        grpc_service("lat", LAT),
        grpc_service("ej", EJ),
        grpc_service("fault", FAULT),
        grpc_service("aged", AGED),
        grpc_service("web", WEB, port_name="http2"),
        service("echo-rr", {"app": "echo"}, cluster_ip=ECHO_RR, port_name="grpc"),
        destination_rule("echo-rr", {"trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}),
        # undeclared protocol ("web" is no protocol prefix): sniffed
        service("s-h1", cluster_ip=S_H1, port_name="web"),
        service("s-h2", cluster_ip=S_H2, port_name="web"),
        service("s-tcp", cluster_ip=S_TCP, port_name="web"),
        destination_rule("echo", {"subsets": subsets}),
        destination_rule(
            "ej",
            {"trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}, "outlierDetection": od}},
        ),
        vs(
            "echo",
            [
                {
                    "name": "jason",
                    "match": [
                        {
                            "uri": {"exact": "/test.Echo/Unary"},
                            "headers": {"x-user": {"exact": "jason"}},
                        }
                    ],
                    "route": [{"destination": {"host": "echo", "subset": "v2"}}],
                },
                {
                    "name": "slow",
                    "match": [{"uri": {"exact": "/test.Echo/Slow"}}],
                    "timeout": "2s",
                    "route": [{"destination": {"host": "echo"}}],
                },
                {"name": "rest", "route": [{"destination": {"host": "echo"}}]},
            ],
        ),
        vs(
            "fault",
            [
                {
                    "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 50}}},
                    "route": [{"destination": {"host": "fault"}}],
                }
            ],
        ),
    ]
    apply(sandbox, files, "grpc", docs)
    for vip in (ECHO, LAT, EJ, FAULT, ECHO_RR, AGED):
        eventually(
            lambda v=vip: unary(sandbox, out["client"], files, v, 1)["codes"] == {"OK": 1},
            f"a gRPC call to {vip}",
            timeout=40,
        )
    # Every echo replica serving: a server still starting refuses its first calls, and the
    # balancer then keeps away from it for its decay time (the spread tests would see two).
    echoes = {"echo-1", "echo-2", "echo-3"}
    eventually(
        lambda: set(unary(sandbox, out["client"], files, ECHO, 30)["answers"]) == echoes,
        "all three echo replicas answering",
        timeout=40,
    )
    return out


def test_one_channel_is_spread_over_three_replicas(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    # Round robin: every call is balanced on its own, so exactly a third each (at L4 all 600
    # would ride the channel's one connection to one pod).
    got = unary(sandbox, pods["client"], files, ECHO_RR, 600)
    assert got == {"answers": {"echo-1": 200, "echo-2": 200, "echo-3": 200}, "codes": {"OK": 600}}
    # The default, peak EWMA, treats replicas of the same speed (within its noise band) as
    # least-request does, and they take turns: about a third each (quiet machine: within 15 %
    # of it). One slow answer (the shared machine stalls a replica) makes that replica's peak
    # its cost, which decays over 10 s, so it takes less for the rest of the run: a full
    # suite's run saw 256/248/96. The bound is the one the slow replica test below keeps
    # under: more than a tenth each, i.e. every replica is spread to, none avoided.
    got = unary(sandbox, pods["client"], files, ECHO, 600)
    assert got["codes"] == {"OK": 600}, got
    answers = got["answers"]
    assert set(answers) == {"echo-1", "echo-2", "echo-3"}, answers
    assert all(n > 60 for n in answers.values()), answers


def test_slow_replica_gets_under_ten_percent(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    got = unary(sandbox, pods["client"], files, LAT, 600)
    assert got["codes"] == {"OK": 600}, got
    assert got["answers"].get("lat-3", 0) < 60, got["answers"]


def test_unavailable_replica_is_retried_then_ejected(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    flag = Path("/tmp/ej-2.fail")  # the pods share the host's /tmp
    flag.write_text("")
    try:
        got = unary(sandbox, pods["client"], files, EJ, 60)
    finally:
        flag.unlink()
    # Every call succeeds (UNAVAILABLE is in Istio's default retryOn); ej-2 answered only the
    # 3 calls it took to eject it (consecutive5xxErrors: 3; UNAVAILABLE counts as a 503).
    assert got["codes"] == {"OK": 60}, got
    assert "ej-2" not in got["answers"], got
    after = unary(sandbox, pods["client"], files, EJ, 30)
    assert after["codes"] == {"OK": 30}, after
    assert "ej-2" not in after["answers"], after  # still ejected (60 s), though healthy now


def test_header_routing_on_a_grpc_method_goes_to_the_subset(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    jason = unary(sandbox, pods["client"], files, ECHO, 40, "Unary", "x-user=jason")
    assert jason["answers"] == {"echo-2": 40}, jason
    other = unary(sandbox, pods["client"], files, ECHO_RR, 60, "Unary", "x-user=jason")
    assert other["answers"] == {"echo-1": 20, "echo-2": 20, "echo-3": 20}, other  # no route
    alice = unary(sandbox, pods["client"], files, ECHO, 60, "Unary", "x-user=alice")
    assert alice["codes"] == {"OK": 60}, alice
    assert set(alice["answers"]) - {"echo-2"}, alice  # the default rule: every replica


def test_abort_grpc_status_unavailable_at_half(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    n = 400
    got = unary(sandbox, pods["client"], files, FAULT, n)
    low, high = binomial_interval(n, 0.5)
    # a fault abort is never retried: exactly the aborted calls fail, with UNAVAILABLE
    assert set(got["codes"]) <= {"OK", "UNAVAILABLE"}, got
    assert low <= got["codes"].get("UNAVAILABLE", 0) <= high, got


def test_route_timeout_is_deadline_exceeded(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    got = unary(sandbox, pods["client"], files, ECHO, 1, "Slow")
    assert got["codes"] == {"DEADLINE_EXCEEDED": 1}, got


def test_a_server_at_its_max_connection_age_fails_no_call(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    """grpcio's max connection age (common for rebalancing) sends a graceful GOAWAY every
    300 ms while calls are under way: h2 alone made that GOAWAY fail them (python-hyper/h2#1181);
    the destination agent's upstream connection now finishes them and opens a new one."""
    got = unary(sandbox, pods["client"], files, AGED, 150)  # 150 calls of 20 ms: ~10 GOAWAYs
    assert got["codes"] == {"OK": 150}
    assert got["answers"] == {"aged-1": 150}
    # Not by retries either: the destination agent answered every attempt it made with 200 and
    # grpc-status 0 (before, ~12 of them failed as UNAVAILABLE there and the source retried).
    seen: list[Any] = []

    def counted() -> int:
        seen[:] = _metric(sandbox, "istio_requests_total", "aged", reporter="destination")
        return int(sum(s.value for s in seen))

    eventually(lambda: counted() >= 151, "the destination counted the calls")  # + the fixture's
    outcomes = {
        (s.labels["response_code"], s.labels["grpc_response_status"]): s.value for s in seen
    }
    assert outcomes == {("200", "0"): 151}


def test_server_streaming_ten_thousand_messages(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    got = client(sandbox, pods["client"], files, f"{ECHO}:80", "stream", "10000")
    assert got == {"count": 10000, "ordered": True}


def test_bidi_echo_of_1_gib(sandbox: Sandbox, pods: dict[str, Pod], files: Path) -> None:
    # Issue 16's size: flow control end to end through both agents, nothing buffered whole.
    got = client(sandbox, pods["client"], files, f"{ECHO}:80", "bidi", "1024", timeout=300)
    assert got == {"sent": 1024 * 1024 * 1024, "same": True}


def test_curl_and_h2load_against_an_http2_service_are_counted_per_status(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    c = pods["client"]
    r = sandbox.exec(c, ["curl", "-sS", "--http2-prior-knowledge", "-i", f"http://{WEB}/hello"])
    assert str(r.stdout).startswith("HTTP/2 200"), (r.stdout, r.stderr)
    assert re.search(r"web-[12] /hello", str(r.stdout)), r.stdout
    load = sandbox.exec(c, ["h2load", "-n", "300", "-c", "2", "-m", "10", f"http://{WEB}/load"])
    assert "300 succeeded" in str(load.stdout), load.stdout
    assert "300 2xx" in str(load.stdout), load.stdout
    miss = sandbox.exec(c, ["h2load", "-n", "50", "-c", "1", f"http://{WEB}/status/503"])
    assert "50 5xx" in str(miss.stdout), miss.stdout

    def counted() -> dict[str, float]:
        out: dict[str, float] = {}
        for s in _metric(sandbox, "istio_requests_total", "web"):
            code = s.labels["response_code"]
            out[code] = out.get(code, 0) + s.value
        return out

    eventually(lambda: counted().get("503", 0) >= 50, "50 503s counted for web")
    got = counted()
    assert got.get("200", 0) >= 301, got  # curl + h2load (+ none of the 503s)
    assert got["503"] == 50, got


def test_grpc_metrics_carry_protocol_and_grpc_status(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    got = unary(sandbox, pods["client"], files, FAULT, 40)
    assert set(got["codes"]) == {"OK", "UNAVAILABLE"}, got  # P(one kind only) = 2^-39
    fault: list[Any] = []

    def both_counted() -> bool:
        fault[:] = _metric(sandbox, "istio_requests_total", "fault")
        return {"0", "14"} <= {s.labels["grpc_response_status"] for s in fault}

    eventually(both_counted, "grpc_response_status 0 and 14 for fault")
    assert {s.labels["request_protocol"] for s in fault} == {"grpc"}
    assert all(s.labels["response_code"] == "200" for s in fault)


def _metric(sb: Sandbox, name: str, service_host: str, reporter: str = "source") -> list[Any]:
    """`name`'s samples for the service, from n1's agent (source) or n2's (destination)."""
    node = "n1" if reporter == "source" else "n2"
    url = f"http://{sb.node(node).underlay_ip}:15020/stats/prometheus"
    r = sb.exec("outside", ["curl", "-sf", "--max-time", "5", url], timeout=15)
    fqdn = f"{service_host}.default.svc.cluster.local"
    return [
        s
        for s in samples(str(r.stdout), name)
        if s.labels.get("destination_service") == fqdn and s.labels["reporter"] == reporter
    ]


def test_undeclared_ports_are_sniffed(sandbox: Sandbox, pods: dict[str, Pod], files: Path) -> None:
    c = pods["client"]

    def answers(*argv: str) -> str:
        return str(sandbox.exec(c, ["curl", "-sS", "-m", "5", *argv]).stdout)

    # HTTP/1.1 → the HTTP/1.1 proxy (a request metric); h2 prior knowledge → the HTTP/2 proxy
    eventually(
        lambda: "version=s-h1 path=/one" in answers(f"http://{S_H1}/one"), "s-h1 over HTTP/1.1"
    )
    eventually(
        lambda: "s-h2 /two" in answers("--http2-prior-knowledge", f"http://{S_H2}/two"),
        "s-h2 over h2c",
    )
    # a server-first protocol: relayed at L4 once the sniff timeout (0.1 s) passed
    r = sandbox.exec(c, [PY, str(files / "banner_client.py"), S_TCP])
    got = json.loads(str(r.stdout))
    assert got["greeting"] == "HELLO\n", got
    assert got["echo"] == "ping", got
    assert got["greeting_s"] < 1.0, got  # delayed by the sniff timeout, not stalled
    eventually(lambda: bool(_metric(sandbox, "istio_requests_total", "s-h1")), "s-h1 requests")
    eventually(lambda: bool(_metric(sandbox, "istio_requests_total", "s-h2")), "s-h2 requests")
    assert {
        s.labels["request_protocol"] for s in _metric(sandbox, "istio_requests_total", "s-h1")
    } == {"http"}
    eventually(
        lambda: bool(_metric(sandbox, "istio_tcp_connections_opened_total", "s-tcp")),
        "s-tcp counted as a TCP connection",
    )
    assert not _metric(sandbox, "istio_requests_total", "s-tcp")
