"""`meshctl explain` end to end: `meshctl apply` into a real sqlite store, then `main(["explain",
…])`, asserting the JSON report's fields and the table's key lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from corpus import corpus_path
from kube_objects import mirror
from snapshot_docs import endpoint_slice, service

from nodeagent.meshctl.explain import ExplainError, parse_headers, parse_target
from nodeagent.meshctl.main import main


def _workload(name: str, ip: str, node: str, labels: str, sa: str = "default") -> str:
    return f"""\
apiVersion: mesh.nodeagent.io/v1alpha1
kind: Workload
metadata: {{name: {name}, uid: uid-{name}, labels: {{{labels}}}}}
spec: {{node: {node}, addresses: [{ip}], serviceAccount: {sa}}}
"""


MY_APP = "\n---\n".join(
    [
        """\
apiVersion: v1
kind: Service
metadata: {name: my-app}
spec:
  selector: {app: my-app}
  ports: [{name: http, port: 80, targetPort: 8080}]
""",
        """\
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  selector: {app: db}
  ports: [{name: tcp-db, port: 5432, targetPort: 5432}]
""",
        _workload("my-app-v1", "10.1.0.11", "node-1", "app: my-app, version: v1.0.0", "my-app"),
        _workload("my-app-v2", "10.2.0.11", "node-2", "app: my-app, version: v2.0.0", "my-app"),
        _workload("client", "10.1.0.5", "node-1", "app: client", "client"),
        _workload("db-0", "10.2.0.20", "node-2", "app: db", "db"),
    ]
)

BOOKINFO = "\n---\n".join(
    [
        f"""\
apiVersion: v1
kind: Service
metadata: {{name: {app}}}
spec:
  selector: {{app: {app}}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
"""
        for app in ("productpage", "reviews", "ratings", "details")
    ]
    + [
        _workload(f"{app}-{v}", f"10.1.1.{n}", f"node-{n % 2 + 1}", f"app: {app}, version: {v}")
        for n, (app, v) in enumerate(
            [
                ("productpage", "v1"),
                ("reviews", "v1"),
                ("reviews", "v2"),
                ("reviews", "v3"),
                ("ratings", "v1"),
                ("ratings", "v2"),
                ("details", "v1"),
            ],
            start=10,
        )
    ]
)

STRICT_AND_DENY = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client}
spec:
  selector: {matchLabels: {version: v2.0.0}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
"""


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MESH_STORE", f"sqlite:///{tmp_path}/mesh.db")
    monkeypatch.delenv("MESH_VIP_RANGE", raising=False)
    return tmp_path


def _apply(tmp: Path, capsys: pytest.CaptureFixture[str], *files: Path, text: str = "") -> None:
    args = ["apply"]
    if text:
        path = tmp / f"extra-{abs(hash(text))}.yaml"
        path.write_text(text)
        args += ["-f", str(path)]
    for f in files:
        args += ["-f", str(f)]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()


def _explain(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["explain", *args, "-o", "json"]) == 0, capsys.readouterr().err
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def _table(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["explain", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _dests(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (d["weight"], d["subset"], d["subset_labels"], [e["pod"] for e in d["endpoints"]])
        for d in report["destinations"]
    ]


# -- the canary, through the gateway and from a pod --------------------------------------------


def test_canary_through_the_gateway_shows_both_weighted_subsets(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, corpus_path("seed", "01-canary.yaml"), text=MY_APP)
    report = _explain(capsys, "--from", "gateway", "--to", "http://my-app/my-app/x?y=1")
    assert report["source"]["kind"] == "gateway"
    assert report["source"]["principal"] == (
        "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    )
    assert report["resolved"]["gateway"] == "default/http-gateway"
    assert report["outcome"] == "route"
    rule = report["route"]["rule"]
    assert (rule["virtual_service"], rule["rule_index"], rule["match_index"]) == (
        "default/my-app",
        0,
        0,
    )
    assert rule["conditions"] == ['uri prefix "/my-app"']
    assert report["route"]["upstream_path"] == "/x?y=1"  # rewrite /my-app → /
    assert _dests(report) == [
        (90, "v1", {"version": "v1.0.0"}, ["default/my-app-v1"]),
        (10, "v2", {"version": "v2.0.0"}, ["default/my-app-v2"]),
    ]
    ep = report["destinations"][1]["endpoints"][0]
    assert ep == {
        "pod": "default/my-app-v2",
        "ip": "10.2.0.11",
        "port": 8080,
        "node": "node-2",
        "identity": "spiffe://cluster.local/ns/default/sa/my-app",
        "labels": {"app": "my-app", "version": "v2.0.0"},
        "tunnel": True,
        "mtls_mode": "PERMISSIVE",
        "authorization": {
            "decision": "ALLOW",
            "policy": None,
            "reason": "mtls; http; no ALLOW policy selects the workload",
            "audited": [],
            "layer": "http",  # an HTTP port: the request is authorized with every field
        },
        "jwt": {"rules": [], "token": "none", "required": False, "without_token": "ALLOW"},
    }
    # The gateway path does not match a host outside the Gateway's prefix rule.
    miss = _explain(capsys, "--from", "gateway", "--to", "http://my-app/other")
    assert miss["outcome"] == "no_route"
    assert miss["summary"].startswith("no route (404 NR)")


HTTPS_GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: http-gateway, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [my-app.example.com]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: https-a, protocol: HTTPS}
    hosts: [my-app.example.com]
    tls: {mode: SIMPLE, credentialName: my-app}
  - port: {number: 443, name: https-b, protocol: HTTPS}
    hosts: [other.example.com]
    tls: {mode: SIMPLE, credentialName: other}
"""


def test_https_through_the_gateway_by_sni_redirect_and_the_other_server(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, corpus_path("seed", "01-canary.yaml"), text=MY_APP)
    _apply(store, capsys, text=HTTPS_GATEWAY)
    url = "https://my-app.example.com/my-app/x"
    report = _explain(capsys, "--from", "gateway", "--to", url)
    assert report["resolved"]["tls"] == "SIMPLE"
    assert report["outcome"] == "route"
    redirect = _explain(capsys, "--from", "gateway", "--to", "http://my-app.example.com/a")
    assert redirect["outcome"] == "redirect", redirect
    other = _explain(capsys, "--from", "gateway", "--to", url, "-H", "Host: other.example.com")
    assert other["outcome"] == "no_route"
    assert other["summary"].startswith("no route (404 NR): no HTTPS Gateway server")


def test_canary_table_output_has_the_key_lines(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, corpus_path("seed", "01-canary.yaml"), text=MY_APP)
    out = _table(capsys, "--from", "gateway", "--to", "http://my-app/my-app/x")
    assert "Gateway:     default/http-gateway on port 80 for host my-app" in out
    assert "Matched:     VirtualService default/my-app rule 0, route name default/my-app.0" in out
    assert 'match clause 0: uri prefix "/my-app"' in out
    assert "Upstream:    path /x, authority my-app (rewritten)" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["WEIGHT", "HOST", "PORT", "SUBSET", "LABELS", "ENDPOINTS"] in lines
    assert ["90", "my-app.default.svc.cluster.local", "80", "v1", "version=v1.0.0", "1"] in lines
    assert ["10", "my-app.default.svc.cluster.local", "80", "v2", "version=v2.0.0", "1"] in lines
    assert out.rstrip().splitlines()[-1] == (
        "Verdict:     routed by default/my-app.0: 90% to my-app.default.svc.cluster.local:80 "
        "subset v1, 10% to my-app.default.svc.cluster.local:80 subset v2"
    )


def test_a_pod_gets_the_default_route_not_the_gateway_rule(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, corpus_path("seed", "01-canary.yaml"), text=MY_APP)
    report = _explain(capsys, "--from", "default/client", "--to", "http://my-app/my-app/x")
    res = report["resolved"]
    assert (res["via"], res["port"], res["protocol"], res["target_port"]) == (
        "dns",
        80,
        "http",
        8080,
    )
    assert res["service"]["ref"] == "default/my-app"
    assert res["address"] == res["service"]["addresses"][0]
    assert res["address"].startswith("10.96.0.")
    assert report["route"]["route_name"] == "default"
    assert report["route"]["rule"] is None
    assert report["route"]["upstream_path"] == "/my-app/x"  # no rewrite outside the gateway
    assert report["route"]["retries"]["default"] is True
    assert _dests(report) == [(100, None, None, ["default/my-app-v1", "default/my-app-v2"])]


# -- A/B test and fault ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "rule", "subset"),
    [("Mozilla/5.0 Chrome/120", 0, "v1"), ("Mozilla/5.0 Firefox", 1, "v2")],
)
def test_ab_by_user_agent(
    store: Path, capsys: pytest.CaptureFixture[str], agent: str, rule: int, subset: str
) -> None:
    _apply(store, capsys, corpus_path("seed", "01-canary.yaml"), text=MY_APP)
    _apply(store, capsys, corpus_path("seed", "03-ab-user-agent.yaml"))
    args = ["--from", "gateway", "--to", "http://my-app/my-app", "-H", f"User-Agent: {agent}"]
    report = _explain(capsys, *args)
    assert report["request"]["headers"] == {"user-agent": agent}
    assert report["route"]["rule"]["rule_index"] == rule
    assert report["route"]["rule"]["conditions"] == [
        'uri prefix "/my-app"',
        f'headers[user-agent] regex ".*{"Chrome" if rule == 0 else "Mozilla"}.*"',
    ]
    assert [(d["weight"], d["subset"]) for d in report["destinations"]] == [(100, subset)]


def test_ab_without_a_matching_user_agent_is_404_nr(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, corpus_path("seed", "01-canary.yaml"), text=MY_APP)
    _apply(store, capsys, corpus_path("seed", "03-ab-user-agent.yaml"))
    report = _explain(capsys, "--from", "gateway", "--to", "http://my-app/my-app", "-H", "A: b")
    assert report["outcome"] == "no_route"
    assert report["virtual_services_considered"] == ["default/my-app"]
    assert report["destinations"] == []
    out = _table(capsys, "--from", "gateway", "--to", "http://my-app/my-app")
    assert "Verdict:     no route (404 NR): no rule of default/my-app matches" in out


def test_fault_delay_and_bookinfo_subset(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dr = corpus_path("istio", "bookinfo-networking", "destination-rule-all.yaml")
    _apply(
        store,
        capsys,
        dr,
        corpus_path("seed", "02-fault-delay.yaml"),
        text=MY_APP + "---\n" + BOOKINFO,
    )
    report = _explain(capsys, "--from", "client", "--to", "http://my-app/")
    route = report["route"]
    assert route["route_name"] == "default/my-app-fault.0"
    assert route["rule"]["match_index"] is None
    assert route["fault"] == {"delay": {"seconds": 7.0, "percent": 100.0}}
    assert _dests(report) == [(100, "v2", {"version": "v2"}, ["default/ratings-v2"])]
    assert report["destinations"][0]["port"] == 9080
    out = _table(capsys, "--from", "client", "--to", "http://my-app/")
    assert "Fault:       delay 7s for 100% of requests" in out


def test_bookinfo_reviews_weights_and_header_match(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = ("istio", "bookinfo-networking")
    _apply(
        store,
        capsys,
        corpus_path(*net, "destination-rule-all.yaml"),
        corpus_path(*net, "virtual-service-reviews-80-20.yaml"),
        text=BOOKINFO,
    )
    report = _explain(capsys, "--from", "productpage-v1", "--to", "http://reviews:9080/reviews/1")
    assert report["resolved"]["service"]["host"] == "reviews.default.svc.cluster.local"
    assert _dests(report) == [
        (80, "v1", {"version": "v1"}, ["default/reviews-v1"]),
        (20, "v2", {"version": "v2"}, ["default/reviews-v2"]),
    ]
    _apply(store, capsys, corpus_path(*net, "virtual-service-reviews-jason-v2-v3.yaml"))
    to = ["--from", "productpage-v1", "--to", "http://reviews.default:9080/"]
    jason = _explain(capsys, *to, "-H", "end-user: jason")
    assert jason["route"]["rule"]["conditions"] == ['headers[end-user] exact "jason"']
    assert _dests(jason) == [(100, "v2", {"version": "v2"}, ["default/reviews-v2"])]
    other = _explain(capsys, *to)
    assert other["route"]["rule"]["rule_index"] == 1
    assert _dests(other) == [(100, "v3", {"version": "v3"}, ["default/reviews-v3"])]


# -- security ----------------------------------------------------------------------------------


def test_strict_mtls_and_a_deny_policy(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _apply(
        store,
        capsys,
        corpus_path("seed", "01-canary.yaml"),
        text=MY_APP + "---\n" + STRICT_AND_DENY,
    )
    report = _explain(capsys, "--from", "client", "--to", "http://my-app/")
    eps = {e["pod"]: e for d in report["destinations"] for e in d["endpoints"]}
    v1, v2 = eps["default/my-app-v1"], eps["default/my-app-v2"]
    assert (v1["mtls_mode"], v1["tunnel"], v1["authorization"]["decision"]) == (
        "STRICT",
        True,
        "ALLOW",
    )
    assert v2["mtls_mode"] == "STRICT"
    assert v2["authorization"]["decision"] == "DENY"
    assert v2["authorization"]["policy"] == "default/deny-client"
    assert report["source"]["principal"] == "cluster.local/ns/default/sa/client"
    out = _table(capsys, "--from", "client", "--to", "http://my-app/")
    assert "default/my-app-v2: DENY: mtls; http; denied by DENY policy" in out
    row = next(line.split() for line in out.splitlines() if "10.2.0.11:8080" in line)
    assert row[-5:] == ["STRICT", "yes", "DENY", "by", "default/deny-client"]
    # Another principal is not denied.
    other = _explain(capsys, "--from", "my-app-v1", "--to", "http://my-app/")
    eps = {e["pod"]: e for d in other["destinations"] for e in d["endpoints"]}
    assert eps["default/my-app-v2"]["authorization"]["decision"] == "ALLOW"


# -- TCP, pod IPs, unknown destinations ---------------------------------------------------------


def test_tcp_service_and_pod_ip(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _apply(store, capsys, text=MY_APP)
    report = _explain(capsys, "--from", "client", "--to", "tcp://db:5432")
    assert report["protocol"] == "tcp"
    assert report["resolved"]["protocol"] == "tcp"
    assert report["tcp_route"] == {"route_name": "default"}
    assert _dests(report) == [(100, None, None, ["default/db-0"])]
    direct = _explain(capsys, "--from", "client", "--to", "tcp://10.2.0.20:5432")
    assert direct["outcome"] == "workload"
    assert direct["resolved"]["workload"] == "default/db-0"
    assert direct["destinations"][0]["endpoints"][0]["tunnel"] is True


def test_a_service_without_selector_lists_its_endpoint_slices_meshed_or_not(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, text=MY_APP)
    legacy = service("legacy", None, cluster_ip="10.96.9.9", port=80, target=80)
    legacy["metadata"]["uid"] = "u-legacy"
    slice_ = endpoint_slice("legacy-1", "legacy", ["10.2.0.11", "192.0.2.50"])
    mirror(f"sqlite:///{store}/mesh.db", legacy, slice_)
    report = _explain(capsys, "--from", "client", "--to", "http://legacy/")
    (dest,) = report["destinations"]
    assert dest["endpoint_slices"] is True
    meshed, outside = dest["endpoints"]
    assert (meshed["pod"], meshed["ip"], meshed["port"], meshed["tunnel"]) == (
        "default/my-app-v2",
        "10.2.0.11",
        8080,
        True,
    )
    assert meshed["identity"] == "spiffe://cluster.local/ns/default/sa/my-app"
    assert (outside["pod"], outside["ip"], outside["tunnel"]) == (None, "192.0.2.50", False)
    assert outside["note"] == "outside the mesh: passed through in plaintext"
    table = _table(capsys, "--from", "client", "--to", "http://legacy/")
    assert "from the EndpointSlices of default/legacy (a Service without selector)" in table
    assert "192.0.2.50:8080" in table
    mirror(f"sqlite:///{store}/mesh.db", slice_, delete=True)
    gone = _explain(capsys, "--from", "client", "--to", "http://legacy/")
    assert gone["destinations"][0]["endpoints"] == []
    assert gone["destinations"][0]["error"] == "no endpoints (503 UH)"


def test_unknown_ip_is_passthrough_or_refused(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, text=MY_APP)
    report = _explain(capsys, "--from", "client", "--to", "http://192.0.2.7:8080/x")
    assert report["outcome"] == "unknown"
    assert report["passthrough"]["address"] == "192.0.2.7"
    assert "REGISTRY_ONLY" in report["passthrough"]["registry_only"]
    assert "unknown destination 192.0.2.7:8080" in report["summary"]


GRPC = """\
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 9090, targetPort: 9090}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - name: say-hello
    match: [{uri: {exact: /test.Echo/Hello}}]
    timeout: 2s
    route: [{destination: {host: echo, subset: v2}}]
  - route: [{destination: {host: echo, subset: v1}}]
"""


def test_grpc_method_shows_its_route(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = "\n---\n".join(
        [
            GRPC,
            _workload("echo-1", "10.1.0.31", "node-1", "app: echo, version: v1"),
            _workload("echo-2", "10.2.0.32", "node-2", "app: echo, version: v2"),
        ]
    )
    _apply(store, capsys, text=MY_APP + "\n---\n" + extra)
    report = _explain(capsys, "--from", "client", "--to", "grpc://echo:9090/test.Echo/Hello")
    assert report["protocol"] == "grpc"
    assert report["resolved"]["protocol"] == "grpc"
    assert report["request"]["method"] == "POST"
    assert report["request"]["headers"]["content-type"] == "application/grpc"
    assert report["route"]["route_name"] == "default/echo.say-hello"
    assert _dests(report) == [(100, "v2", {"version": "v2"}, ["default/echo-2"])]
    other = _explain(capsys, "--from", "client", "--to", "grpc://echo:9090/test.Echo/Other")
    assert _dests(other) == [(100, "v1", {"version": "v1"}, ["default/echo-1"])]
    table = _table(capsys, "--from", "client", "--to", "grpc://echo:9090/test.Echo/Hello")
    assert "say-hello" in table


GRPC_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-hello}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
    to: [{operation: {paths: [/test.Echo/Hello]}}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-raw}
spec:
  selector: {app: echo}
  ports: [{name: web, port: 7070, targetPort: 7070}]
"""


def test_grpc_port_gets_the_l7_verdict_per_method(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = "\n---\n".join(
        [
            GRPC,
            GRPC_POLICY,
            _workload("echo-1", "10.1.0.31", "node-1", "app: echo, version: v1"),
            _workload("echo-2", "10.2.0.32", "node-2", "app: echo, version: v2"),
        ]
    )
    _apply(store, capsys, text=MY_APP + "\n---\n" + extra)
    # The destination agent parses a gRPC port: the method (the :path) decides, per endpoint.
    hello = _explain(capsys, "--from", "client", "--to", "grpc://echo:9090/test.Echo/Hello")
    ep = _endpoint(hello, "default/echo-2")
    assert (ep["authorization"]["decision"], ep["authorization"]["layer"]) == ("ALLOW", "http")
    assert ep["authorization"]["policy"] == "default/echo-hello"
    other = _explain(capsys, "--from", "client", "--to", "grpc://echo:9090/test.Echo/Other")
    ep = _endpoint(other, "default/echo-1")
    assert (ep["authorization"]["decision"], ep["authorization"]["layer"]) == ("DENY", "http")
    # An undeclared port is relayed at L4 by the destination: Istio's TCP rule (a `paths`
    # rule matches nothing there) whatever the source sniffed.
    raw = _explain(capsys, "--from", "client", "--to", "http://echo-raw:7070/test.Echo/Hello")
    ep = _endpoint(raw, "default/echo-1")
    assert (ep["authorization"]["decision"], ep["authorization"]["layer"]) == ("DENY", "tcp")


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "nope", "--to", "http://my-app/"], "no workload default/nope in the store"),
        (["--from", "client", "--to", "http://unknown-svc/"], "unknown host unknown-svc"),
        (["--from", "client", "--to", "http://my-app:99999/"], "not a URL"),
        (["--from", "client", "--to", "ftp://my-app/"], "scheme 'ftp'"),
        (["--from", "client", "--to", "tcp://db"], "needs a port"),
        (["--from", "client", "--to", "grpc://my-app/NoMethod"], "package.Service/Method"),
        (["--from", "client", "--to", "http://my-app/", "-H", "novalue"], "expected 'Name: value'"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    store: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    _apply(store, capsys, text=MY_APP)
    assert main(["explain", *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_parsers() -> None:
    t = parse_target("my-app.default.svc.cluster.local:8080/a/b?c=d")
    assert (t.scheme, t.host, t.port, t.path, t.query, t.authority) == (
        "http",
        "my-app.default.svc.cluster.local",
        8080,
        "/a/b",
        "c=d",
        "my-app.default.svc.cluster.local:8080",
    )
    assert parse_target("tcp://10.0.0.1:5432").is_ip
    assert parse_headers(["X-A: 1", "x-a: 2", "Host:  h "]) == {"x-a": "1, 2", "host": "h"}
    with pytest.raises(ExplainError):
        parse_target("http://")


# -- the compiled rule, as the proxy runs it ---------------------------------------------------

COMPILED_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: my-app-api, namespace: default}
spec:
  hosts: [my-app]
  http:
  - name: api
    match:
    - uri: {prefix: "/API/V"}
      ignoreUriCase: true
      headers: {x-user: {prefix: "a"}}
    rewrite:
      uriRegexRewrite: {match: "/api/v([0-9]+)/(.*)", rewrite: "/v\\\\1/\\\\2"}
    headers:
      request: {set: {x-api: "1"}}
    route:
    - destination: {host: my-app}
    timeout: 1500ms
    retries: {attempts: 1, retryOn: "5xx"}
    mirror: {host: my-app}
    mirrorPercentage: {value: 5}
"""


def test_explain_describes_the_compiled_rule_the_proxy_runs(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, text=MY_APP + "---\n" + COMPILED_VS)
    to = ["--from", "client", "--to", "http://my-app/api/v2/users?q=1", "-H", "X-User: alice"]
    route = _explain(capsys, *to)["route"]
    assert route["route_name"] == "default/my-app-api.api"
    rule = route["rule"]
    assert rule["rule_name"] == "api"
    assert rule["match_index"] == 0
    assert rule["match"] == {
        "uri": {"prefix": "/api/v"},  # compiled: folded by ignoreUriCase
        "headers": {"x-user": {"prefix": "a"}},
        "ignoreUriCase": True,
    }
    assert rule["conditions"] == [
        'uri prefix "/api/v"',
        'headers[x-user] prefix "a"',
        "ignoreUriCase",
    ]
    assert route["upstream_path"] == "/v2/users?q=1"  # RE2's \\1 substitution, query kept
    assert route["rewrite"] == {
        "uri": None,
        "authority": None,
        "uri_regex_rewrite": {"match": "/api/v([0-9]+)/(.*)", "rewrite": "/v\\1/\\2"},
    }
    assert route["timeout"] == 1.5
    assert route["retries"]["attempts"] == 1
    assert route["retries"]["retry_on"] == ["5xx"]
    assert route["retries"]["default"] is False
    assert route["mirror"] == {
        "host": "my-app.default.svc.cluster.local",
        "subset": None,
        "port": None,
        "percent": 5.0,
    }
    assert route["request_headers"] == {"request": {"set": {"x-api": "1"}, "add": {}, "remove": []}}
    out = _table(capsys, *to)
    assert "Timeout:     1.5s" in out
    assert "Mirror:      my-app.default.svc.cluster.local" in out
    nomatch = _explain(capsys, "--from", "client", "--to", "http://my-app/api/v2/users")
    assert nomatch["outcome"] == "no_route"  # without the header, no rule matches


L7_POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt}
spec:
  selector: {matchLabels: {app: my-app}}
  jwtRules: [{issuer: "https://issuer.example.com", jwksUri: "https://issuer.example.com/jwks"}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web}
spec:
  selector: {matchLabels: {app: my-app}}
  rules:
  - to: [{operation: {methods: [GET], paths: ["/public/*"]}}]
  - from: [{source: {requestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/admin"]}}]
    when: [{key: "request.auth.claims[groups]", values: [admins]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-get}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def _endpoint(report: dict[str, Any], pod: str) -> dict[str, Any]:
    return next(e for d in report["destinations"] for e in d["endpoints"] if e["pod"] == pod)


def test_l7_verdict_per_endpoint_and_whether_a_jwt_is_required(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _apply(store, capsys, text=MY_APP + "---\n" + L7_POLICIES)
    public = _explain(capsys, "--from", "client", "--to", "http://my-app/public/index.html")
    ep = _endpoint(public, "default/my-app-v1")
    assert ep["authorization"]["decision"] == "ALLOW"
    assert ep["authorization"]["policy"] == "default/web"
    assert ep["authorization"]["layer"] == "http"
    assert ep["jwt"]["rules"] == [{"policy": "default/jwt", "issuer": "https://issuer.example.com"}]
    assert ep["jwt"]["required"] is False
    post = _explain(capsys, "--from", "client", "-X", "POST", "--to", "http://my-app/public/x")
    assert _endpoint(post, "default/my-app-v1")["authorization"]["decision"] == "DENY"

    admin = ["--from", "client", "--to", "http://my-app/admin"]
    anonymous = _endpoint(_explain(capsys, *admin), "default/my-app-v1")
    assert (anonymous["authorization"]["decision"], anonymous["jwt"]["required"]) == ("DENY", True)
    jwt = ["--jwt-principal", "https://issuer.example.com/alice"]
    wrong_group = _explain(capsys, *admin, *jwt, "--jwt-claim", "groups=dev")
    assert _endpoint(wrong_group, "default/my-app-v1")["authorization"]["decision"] == "DENY"
    claims = ["--jwt-claim", "groups=dev", "--jwt-claim", "groups=admins"]
    right = _endpoint(_explain(capsys, *admin, *jwt, *claims), "default/my-app-v1")
    assert right["authorization"]["decision"] == "ALLOW"
    assert right["authorization"]["policy"] == "default/web"
    assert right["jwt"]["token"] == "assumed"
    out = _table(capsys, *admin)
    assert "default/my-app-v1: DENY: mtls; http; no ALLOW policy matched (default/web)" in out
    assert (
        "default/my-app-v1: JWT required; accepted issuers https://issuer.example.com "
        "(default/jwt); without a token: DENY" in out
    )
    # a TCP port keeps Istio's TCP rule: the ALLOW rule with `methods` matches nothing
    db = _endpoint(_explain(capsys, "--from", "client", "--to", "tcp://db:5432"), "default/db-0")
    assert db["authorization"]["layer"] == "tcp"
    assert db["authorization"]["decision"] == "DENY"
    assert "jwt" not in db
    # a token of an issuer no rule accepts is refused before authorization
    stranger = ["--jwt-principal", "https://evil.example.com/mallory"]
    refused = _endpoint(_explain(capsys, *admin, *stranger), "default/my-app-v1")
    assert refused["jwt"]["token"] == "rejected: 401 Jwt issuer is not configured"
    assert refused["authorization"]["decision"] == "DENY"
    assert refused["authorization"]["reason"].endswith("401 Jwt issuer is not configured")


def test_bad_jwt_options_are_refused(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _apply(store, capsys, text=MY_APP)
    to = ["--from", "client", "--to", "http://my-app/"]
    assert main(["explain", *to, "--jwt-claim", "a=b"]) == 1
    assert "--jwt-claim needs --jwt-principal" in capsys.readouterr().err
    # no RequestAuthentication applies: the data path ignores the token
    ignored = _explain(capsys, *to, "--jwt-principal", "https://issuer.example.com/alice")
    ep = _endpoint(ignored, "default/my-app-v1")
    assert ep["jwt"]["token"] == "ignored (no RequestAuthentication applies)"
    assert main(["explain", *to, "--jwt-principal", "nobody"]) == 1
    assert "expected ISSUER/SUBJECT" in capsys.readouterr().err


EDGE_JWT = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: edge, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules: [{issuer: "https://issuer.example.com", jwksUri: "https://issuer.example.com/jwks"}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: edge-requires-jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""


def test_the_gateways_own_jwt_requirement(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _apply(store, capsys, corpus_path("seed", "01-canary.yaml"), text=MY_APP + "---\n" + EDGE_JWT)
    to = ["--from", "gateway", "--to", "http://my-app/my-app/x"]
    anonymous = _explain(capsys, *to)
    checks = anonymous["gateway_checks"]
    assert checks["authorization"]["decision"] == "DENY"
    assert checks["jwt"]["required"] is True
    assert checks["jwt"]["rules"] == [
        {"policy": "istio-system/edge", "issuer": "https://issuer.example.com"}
    ]
    assert anonymous["outcome"] == "denied"
    assert anonymous["summary"] == "denied at the gateway (403 RBAC: access denied)"
    with_jwt = _explain(capsys, *to, "--jwt-principal", "https://issuer.example.com/alice")
    assert with_jwt["gateway_checks"]["authorization"]["decision"] == "ALLOW"
    assert with_jwt["gateway_checks"]["authorization"]["policy"] == "istio-system/edge-requires-jwt"
    assert with_jwt["outcome"] == "route"
    out = _table(capsys, *to)
    assert "At the gateway: DENY: gateway; http; no ALLOW policy matched" in out
    assert "JWT required; accepted issuers https://issuer.example.com (istio-system/edge)" in out
