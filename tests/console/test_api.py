"""The console's JSON API against a snapshot and agents' expositions (the telemetry package's
registry), through the same routes the server serves: graph, health colours, details with
routes from `meshctl explain`, config health, rollouts, and the token guard."""

from __future__ import annotations

import json
from typing import Any

import pytest
from console_fixtures import Calls, exposition, mesh

from nodeagent.console.api import ConsoleState, routes
from nodeagent.console.auth import COOKIE, guard_all
from nodeagent.console.checks import IssuedCert
from nodeagent.console.rollouts import PREFIX, read_rollouts
from nodeagent.console.traffic import parse_scrape
from nodeagent.httpserver import HttpServer
from nodeagent.meshctl.explain import explain
from nodeagent.store import KeyValue
from nodeagent.store.codec import encode

NOW = 1_000_000.0


def state() -> ConsoleState:
    snap = mesh()
    st = ConsoleState(snapshot=snap, clock=lambda: NOW)
    before = exposition(snap, [])
    after = exposition(
        snap,
        [
            Calls("c1", "a1", "my-app", {200: 600}),
            Calls("c1", "a2", "my-app", {200: 149, 500: 1}),  # 0.67 %: degraded
            Calls("c1", "a3", "my-app", {500: 30}),  # failing
            Calls("gw", "a1", "my-app", {200: 60}),
            Calls("a1", "d1", "db", {0: 30}, tcp=True),
        ],
    )
    st.traffic.record("node-1", NOW - 60, parse_scrape(before))
    st.traffic.record("node-1", NOW, parse_scrape(after))
    st.certs = [
        IssuedCert("node-2", "spiffe://cluster.local/ns/default/sa/my-app", "0a", NOW + 86400),
        IssuedCert("node-1", "spiffe://cluster.local/ns/default/sa/client", "0b", NOW + 600),
    ]
    return st


def get(st: ConsoleState, target: str, token: str | None = None, **headers: str) -> Any:
    server = HttpServer(guard_all(routes(st), token))
    response = server.dispatch(
        "GET", target.encode(), b"", [(k.encode(), v.encode()) for k, v in headers.items()]
    )
    return response.status, json.loads(response.body) if response.status != 303 else response


def test_the_graph_has_versions_services_the_gateway_and_rated_edges() -> None:
    status, doc = get(state(), "/api/graph?window=60")
    assert status == 200
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert nodes["svc:default/my-app"]["versions"] == ["v1", "v2", "v3"]
    assert nodes["wl:default/my-app-v2"]["version"] == "v2"
    assert nodes["gateway"]["kind"] == "gateway"
    edges = {(e["source"], e["target"]): e for e in doc["edges"]}
    client = edges[("wl:default/client", "svc:default/my-app")]
    assert client["request_rate"] == pytest.approx(780 / 60, abs=1e-3)
    assert client["protocol"] == "http"
    assert client["mtls"]
    assert edges[("gateway", "svc:default/my-app")]["request_rate"] == pytest.approx(1.0)
    tcp = edges[("wl:default/my-app-v1", "svc:default/db")]
    assert tcp["protocol"] == "tcp"
    assert tcp["connection_rate"] == pytest.approx(0.5)
    assert doc["windows"] == [30, 60, 300, 900]


def test_health_colours_follow_kiali_thresholds() -> None:
    _, doc = get(state(), "/api/graph")
    health = {n["id"]: n["health"] for n in doc["nodes"]}
    assert health["wl:default/my-app-v1"] == "healthy"
    assert health["wl:default/my-app-v2"] == "degraded"
    assert health["wl:default/my-app-v3"] == "failing"
    assert health["wl:default/db"] == "healthy"  # TCP only: traffic, no 5xx to speak of


def test_node_details_show_traffic_share_routes_from_explain_policies_and_certs() -> None:
    st = state()
    status, doc = get(st, "/api/node?id=svc:default/my-app")
    assert status == 200
    shares = {v["version"]: v["share"] for v in doc["versions"]}
    assert shares["v1"] == pytest.approx(660 / 840, abs=1e-3)
    (route,) = doc["routes"]
    expected = explain(
        st.snapshot, source="default/client", url="http://my-app.default.svc.cluster.local:80/"
    )
    assert route["source"] == "default/client"
    assert route["summary"] == expected["summary"]
    assert [(d["subset"], d["weight"]) for d in route["destinations"]] == [("v1", 80), ("v2", 20)]
    assert [p["ref"] for p in doc["policies"]] == ["default/my-app-allow"]
    assert {c["identity"] for c in doc["certificates"]} == {
        "spiffe://cluster.local/ns/default/sa/my-app"
    }


def test_edge_details_explain_from_the_edge_source() -> None:
    _, graph = get(state(), "/api/graph")
    edge = next(e for e in graph["edges"] if e["source"] == "gateway")
    status, doc = get(state(), f"/api/edge?id={edge['id']}")
    assert status == 200
    assert doc["edge"]["id"] == edge["id"]
    assert doc["routes"][0]["source"] == "gateway"


def test_config_health_names_each_object_with_a_fix() -> None:
    _, doc = get(state(), "/api/health")
    found = {(f["kind"], f["ref"], f["check"]) for f in doc["findings"]}
    assert found == {
        ("VirtualService", "default/my-app-typo", "undefined-subset"),
        ("DestinationRule", "default/my-app", "subset-without-pods"),  # v9
        ("AuthorizationPolicy", "default/nobody", "selects-nothing"),
        ("Gateway", "default/lonely", "unbound-gateway"),
        ("Certificate", "spiffe://cluster.local/ns/default/sa/client", "expires-soon"),
    }
    assert all(f["fix"] for f in doc["findings"])


def test_a_route_to_a_defined_subset_without_pods_is_a_finding() -> None:
    st = state()
    from console_fixtures import mesh_docs, vs
    from snapshot_docs import snapshot_of

    st.snapshot = snapshot_of([*mesh_docs(), vs("to-v9", "my-app", [("v9", 100)])])
    _, doc = get(st, "/api/health")
    assert ("default/to-v9", "subset-without-pods") in {
        (f["ref"], f["check"]) for f in doc["findings"]
    }


def test_rollouts_are_read_from_their_records_and_a_bad_one_is_an_error_row() -> None:
    record = {
        "phase": "Progressing",
        "host": "my-app",
        "stable": "v1",
        "canary": "v2",
        "weight": 30,
        "failedChecks": 1,
        "iteration": 3,
        "lastAnalysis": {"success-rate": 0.99, "latency-p99": None},
        "events": [{"time": NOW - 5, "message": "weight 30"}],
        "history": [
            {"time": NOW - 60, "weight": 10, "analysis": {"success-rate": 1.0}},
            {"time": NOW - 5, "weight": 30, "analysis": {"success-rate": 0.99}},
        ],
        "updated": NOW,
    }
    kvs = [
        KeyValue(PREFIX + "default/my-app", encode(record), 1, 1, 1),
        KeyValue(PREFIX + "default/broken", b"\xc1", 2, 2, 1),
        KeyValue(PREFIX + "default/wrong", encode({**record, "phase": "Sideways"}), 3, 3, 1),
    ]
    st = state()
    st.rollouts = read_rollouts(kvs)
    _, doc = get(st, "/api/rollouts")
    broken, good, wrong = doc["rollouts"]
    assert "does not decode" in broken["error"]
    assert "phase 'Sideways'" in wrong["error"]
    assert good["ref"] == "default/my-app"
    assert good["phase"] == "Progressing"
    assert good["weight"] == 30
    assert good["analysis"] == {"latency-p99": None, "success-rate": 0.99}
    assert [h["weight"] for h in good["history"]] == [10, 30]


def test_bad_queries_are_400_naming_the_problem() -> None:
    status, doc = get(state(), "/api/graph?window=7")
    assert status == 400
    assert "window='7'" in doc["error"]
    status, doc = get(state(), "/api/node?id=wl:default/nope")
    assert status == 400
    assert "no node" in doc["error"]
    status, doc = get(state(), "/api/node")
    assert status == 400
    assert "id" in doc["error"]


def test_the_token_guards_every_path_and_a_token_link_sets_the_cookie() -> None:
    token = "s3cret-token-0123456789"
    status, _ = get(state(), "/api/graph", token)
    assert status == 401
    status, _ = get(state(), "/", token)
    assert status == 401
    status, _ = get(state(), "/api/graph", token, authorization=f"Bearer {token}")
    assert status == 200
    status, _ = get(state(), "/api/graph", token, authorization="Bearer wrong-token-000000")
    assert status == 401
    status, response = get(state(), f"/?token={token}", token)
    assert status == 303
    headers = dict(response.headers)
    assert headers["location"] == "/"
    assert headers["set-cookie"].startswith(f"{COOKIE}={token};")
    assert "HttpOnly" in headers["set-cookie"]
    status, _ = get(state(), "/api/health", token, cookie=f"{COOKIE}={token}")
    assert status == 200


def test_the_page_is_served_from_package_data() -> None:
    server = HttpServer(routes(state()))
    page = server.dispatch("GET", b"/")
    assert page.status == 200
    assert page.content_type.startswith("text/html")
    assert b'src="/app.js"' in page.body
    script = server.dispatch("GET", b"/graph.js")
    assert script.content_type.startswith("text/javascript")
    assert server.dispatch("POST", b"/api/graph").status == 405


def test_http_carried_through_the_tunnel_is_one_http_edge_not_a_second_tcp_one() -> None:
    st = state()
    snap = st.snapshot
    both = [Calls("c1", "a1", "my-app", {200: 60}), Calls("c1", "a1", "my-app", {0: 6}, tcp=True)]
    st.traffic.record("node-9", NOW - 60, parse_scrape(exposition(snap, [])))
    st.traffic.record("node-9", NOW, parse_scrape(exposition(snap, both)))
    _, doc = get(st, "/api/graph")
    pair = [e for e in doc["edges"] if e["source"] == "wl:default/client"]
    assert [e["protocol"] for e in pair] == ["http"]
    assert pair[0]["connection_rate"] == pytest.approx(0.1)


def test_requests_to_a_grpc_service_are_a_grpc_edge() -> None:
    from console_fixtures import mesh_docs
    from snapshot_docs import service, snapshot_of, workload

    docs = [
        *mesh_docs(),
        service("greeter", port=50051, target=50051, port_name="grpc-api"),
        workload("g1", "10.1.0.20", {"app": "greeter", "version": "v1"}, name="greeter-v1"),
    ]
    st = ConsoleState(snapshot=snapshot_of(docs), clock=lambda: NOW)
    st.traffic.record("n", NOW - 10, parse_scrape(exposition(st.snapshot, [])))
    calls = [Calls("c1", "g1", "greeter", {200: 10}), Calls("c1", "a1", "my-app", {200: 10})]
    st.traffic.record("n", NOW, parse_scrape(exposition(st.snapshot, calls)))
    _, doc = get(st, "/api/graph")
    protocols = {e["target"]: e["protocol"] for e in doc["edges"]}
    assert protocols["svc:default/greeter"] == "grpc"
    assert protocols["svc:default/my-app"] == "http"
