"""Per-kind validation: Istio's rules, unsupported fields by path, normalization."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.config.batch import Document, check_references, validate_batch, validate_document
from nodeagent.config.documents import RawDocument, load_text
from nodeagent.config.errors import Source
from nodeagent.store import keys


def _validate(doc: dict[str, Any], namespace: str = "default") -> Document | list[str]:
    result = validate_document(RawDocument(Source("t.yaml", 0, 1), doc), namespace)
    if isinstance(result, Document):
        return result
    return [str(e) for e in result]


def _errors(doc: dict[str, Any]) -> list[str]:
    result = _validate(doc)
    assert isinstance(result, list), f"expected errors, got {result}"
    return result


def _ok(doc: dict[str, Any], namespace: str = "default") -> Document:
    result = _validate(doc, namespace)
    assert isinstance(result, Document), result
    return result


def vs(http: list[Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hosts": ["reviews"], **spec}
    if http is not None:
        body["http"] = http
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": body,
    }


def route(*weights: int | None, subset: str | None = None) -> list[dict[str, Any]]:
    out = []
    for i, w in enumerate(weights):
        d: dict[str, Any] = {"destination": {"host": "reviews", "subset": subset or f"v{i + 1}"}}
        if w is not None:
            d["weight"] = w
        out.append(d)
    return out


def test_weights_must_sum_to_100_and_the_error_names_them() -> None:
    errors = _errors(vs([{"route": route(90, 9)}]))
    assert errors == [
        "t.yaml:1: VirtualService default/reviews: spec.http[0].route: weights 90+9=99 "
        "must sum to 100"
    ]
    _ok(vs([{"route": route(90, 10)}]))
    _ok(vs([{"route": route(None)}]))
    assert "weights 0+0=0" in _errors(vs([{"route": route(None, None)}]))[0]


def test_tcp_weights_are_checked_too() -> None:
    errors = _errors(vs(tcp=[{"route": route(50, 40)}]))
    assert "spec.tcp[0].route: weights 50+40=90 must sum to 100" in errors[0]


def test_unsupported_fields_are_rejected_by_path() -> None:
    errors = _errors(vs([{"route": route(None), "corsPolicy": {"allowOrigins": []}}]))
    assert errors == [
        "t.yaml:1: VirtualService default/reviews: spec.http[0].corsPolicy is not supported"
    ]
    errors = _errors(vs(tls=[{"match": [{"sniHosts": ["a"], "sourceSubnet": "10.0.0.0/8"}]}]))
    assert any("spec.tls[0].match[0].sourceSubnet is not supported" in e for e in errors)


def test_unknown_fields_are_rejected_not_ignored() -> None:
    errors = _errors(vs([{"route": route(None), "rewirte": {"uri": "/"}}]))
    assert errors[0].endswith("spec.http[0].rewirte: unknown field")


_BAD_RE2 = "(?=Chrome).*"  # a lookahead: Python's `re` has it, RE2 does not


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"match": [{"uri": {"regex": _BAD_RE2}}]}, "match[0].uri.regex"),
        ({"match": [{"authority": {"regex": _BAD_RE2}}]}, "match[0].authority.regex"),
        ({"match": [{"method": {"regex": _BAD_RE2}}]}, "match[0].method.regex"),
        ({"match": [{"scheme": {"regex": _BAD_RE2}}]}, "match[0].scheme.regex"),
        (
            {"match": [{"headers": {"user-agent": {"regex": _BAD_RE2}}}]},
            "match[0].headers[user-agent].regex",
        ),
        (
            {"match": [{"withoutHeaders": {"x-debug": {"regex": _BAD_RE2}}}]},
            "match[0].withoutHeaders[x-debug].regex",
        ),
        ({"match": [{"queryParams": {"q": {"regex": _BAD_RE2}}}]}, "match[0].queryParams[q].regex"),
        (
            {"rewrite": {"uriRegexRewrite": {"match": _BAD_RE2, "rewrite": "/"}}},
            "rewrite.uriRegexRewrite.match",
        ),
    ],
)
def test_regexes_must_be_re2_and_the_error_names_the_field(
    rule: dict[str, Any], field: str
) -> None:
    errors = _errors(vs([{**rule, "route": route(None)}]))
    assert len(errors) == 1
    assert f"spec.http[0].{field}" in errors[0]
    assert "not valid RE2: invalid perl operator: (?=" in errors[0]


@pytest.mark.parametrize("pattern", ["(a+)+b", "(a|aa)+$", r"^(\w+\s?)*$", r"/api/\pN+\z"])
def test_re2_patterns_are_accepted(pattern: str) -> None:
    _ok(vs([{"match": [{"uri": {"regex": pattern}}], "route": route(None)}]))


def test_durations_are_checked() -> None:
    errors = _errors(vs([{"route": route(None), "timeout": "7 seconds"}]))
    assert "spec.http[0].timeout: invalid duration" in errors[0]
    fault = {"delay": {"fixedDelay": "0.5ms", "percentage": {"value": 10}}}
    errors = _errors(vs([{"route": route(None), "fault": fault}]))
    assert "spec.http[0].fault.delay.fixedDelay" in errors[0]
    assert "at least 1ms" in errors[0]
    _ok(
        vs(
            [
                {
                    "route": route(None),
                    "timeout": "1.5s",
                    "retries": {
                        "attempts": 3,
                        "perTryTimeout": "100ms",
                        "retryOn": "5xx,connect-failure,503",
                    },
                }
            ]
        )
    )


def test_route_actions_are_exclusive() -> None:
    errors = _errors(vs([{"route": route(None), "redirect": {"uri": "/x"}}]))
    assert "only one of route, redirect, directResponse" in errors[0]
    errors = _errors(vs([{"match": [{"uri": {"prefix": "/"}}]}]))
    assert "HTTP route, redirect or directResponse is required" in errors[0]
    errors = _errors(vs([{"redirect": {"uri": "/x"}, "rewrite": {"uri": "/y"}}]))
    assert "both rewrite and redirect" in errors[0]
    _ok(vs([{"directResponse": {"status": 503, "body": {"string": "down"}}}]))
    errors = _errors(vs([{"directResponse": {"status": 99}}]))
    assert "status must be between 200 and 599" in errors[0]


def test_string_match_needs_exactly_one_kind() -> None:
    errors = _errors(
        vs([{"match": [{"uri": {"exact": "/a", "prefix": "/"}}], "route": route(None)}])
    )
    assert "only one of exact, prefix, regex" in errors[0]
    errors = _errors(vs([{"match": [{"uri": {}}], "route": route(None)}]))
    assert "must have exact, prefix or regex" in errors[0]


def test_everything_later_issues_need_is_accepted() -> None:
    http = [
        {
            "name": "all",
            "match": [
                {
                    "uri": {"prefix": "/api"},
                    "method": {"exact": "GET"},
                    "headers": {"x-user": {"exact": "jason"}, "x-present": {}},
                    "queryParams": {"debug": {"exact": "1"}},
                    "port": 80,
                    "ignoreUriCase": True,
                }
            ],
            "route": [
                {
                    "destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}},
                    "weight": 75,
                    "headers": {"request": {"set": {"x-a": "1"}, "remove": ["x-b"]}},
                },
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 25},
            ],
            "rewrite": {"uri": "/"},
            "headers": {"response": {"add": {"x-c": "2"}}},
            "timeout": "10s",
            "retries": {"attempts": 2, "perTryTimeout": "2s"},
            "fault": {
                "delay": {"fixedDelay": "7s", "percent": 100},
                "abort": {"httpStatus": 500, "percentage": {"value": 0.5}},
            },
            "mirror": {"host": "shadow"},
            "mirrorPercentage": {"value": 10.0},
        },
        {"redirect": {"uri": "/new", "redirectCode": 301, "scheme": "https"}},
    ]
    tcp = [{"match": [{"port": 3306}], "route": [{"destination": {"host": "db"}}]}]
    _ok(vs(http, tcp=tcp, gateways=["mesh", "istio-system/gw"], exportTo=["."]))


def test_mesh_bound_wildcard_host_is_rejected() -> None:
    errors = _errors(vs([{"route": route(None)}], hosts=["*"]))
    assert "wildcard host * is not allowed" in errors[0]
    _ok(vs([{"route": route(None)}], hosts=["*"], gateways=["gw"]))


def dr(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "prod"},
        "spec": {"host": "reviews", **spec},
    }


def test_destination_rule_traffic_policy() -> None:
    policy = {
        "loadBalancer": {
            "consistentHash": {"httpHeaderName": "x-user", "maglev": {"tableSize": 65537}}
        },
        "connectionPool": {
            "tcp": {"maxConnections": 100, "connectTimeout": "30ms"},
            "http": {"http1MaxPendingRequests": 10, "maxRequestsPerConnection": 1},
        },
        "outlierDetection": {
            "consecutive5xxErrors": 7,
            "interval": "5m",
            "baseEjectionTime": "15m",
        },
        "tls": {"mode": "ISTIO_MUTUAL"},
        "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}}],
    }
    subsets = [
        {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}}
    ]
    doc = _ok(dr(trafficPolicy=policy, subsets=subsets))
    assert doc.key == keys.config("DestinationRule", "prod", "reviews")
    for lb in (
        {"useSourceIp": True},
        {"httpCookie": {"name": "s", "ttl": "0s"}},
        {"httpQueryParameterName": "u", "ringHash": {"minimumRingSize": 1024}},
    ):
        _ok(dr(trafficPolicy={"loadBalancer": {"consistentHash": lb}}))


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        ({"loadBalancer": {"simple": "FASTEST"}}, 'Unsupported value: "FASTEST"'),
        (
            {"loadBalancer": {"simple": "RANDOM", "consistentHash": {"useSourceIp": True}}},
            "only one of simple, consistentHash",
        ),
        ({"loadBalancer": {"consistentHash": {"maglev": {"tableSize": 1000}}}}, "prime"),
        ({"loadBalancer": {"localityLbSetting": {}}}, "localityLbSetting is not supported"),
        ({"tls": {"mode": "MUTUAL"}}, "MUTUAL TLS requires clientCertificate and privateKey"),
        (
            {"tls": {"mode": "SIMPLE", "clientCertificate": "/c.pem"}},
            "tls.clientCertificate is only meaningful with mode MUTUAL",
        ),
        (
            {"tls": {"mode": "SIMPLE", "insecureSkipVerify": True, "caCertificates": "/ca.pem"}},
            "tls.insecureSkipVerify: insecureSkipVerify skips verification",
        ),
        ({"tls": {"mode": "SIMPLE", "credentialName": "x"}}, "credentialName is not supported"),
        ({"outlierDetection": {"maxEjectionPercent": 150}}, "between 0 and 100"),
        (
            {"portLevelSettings": [{"port": {"number": 80}}, {"port": {"number": 80}}]},
            "Duplicate value: 80",
        ),
        ({"tunnel": {}}, "spec.trafficPolicy.tunnel is not supported"),
    ],
)
def test_destination_rule_errors(policy: dict[str, Any], problem: str) -> None:
    errors = _errors(dr(trafficPolicy=policy))
    assert any(problem in e for e in errors), errors


def test_duplicate_subsets() -> None:
    errors = _errors(dr(subsets=[{"name": "v1"}, {"name": "v1"}]))
    assert "spec.subsets[1].name: Duplicate value" in errors[0]


def test_gateway() -> None:
    gw = {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [
                {
                    "port": {"number": 80, "name": "http", "protocol": "HTTP"},
                    "hosts": ["*"],
                    "tls": {"httpsRedirect": True},
                },
                {
                    "port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                    "hosts": ["prod/*.example.com"],
                    "tls": {
                        "mode": "SIMPLE",
                        "serverCertificate": "/c.pem",
                        "privateKey": "/k.pem",
                    },
                },
            ],
        },
    }
    _ok(gw)
    gw["spec"]["servers"][1]["tls"] = {"mode": "SIMPLE"}
    assert "requires credentialName or serverCertificate and privateKey" in _errors(gw)[0]
    del gw["spec"]["servers"][1]["tls"]
    assert "must have TLS settings" in _errors(gw)[0]
    gw["spec"]["servers"][1]["bind"] = "0.0.0.0"
    assert any("spec.servers[1].bind is not supported" in e for e in _errors(gw))


def _gateway(*servers: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": list(servers)},
    }


def _server(protocol: str, **tls: Any) -> dict[str, Any]:
    return {
        "port": {"number": 443, "name": "p", "protocol": protocol},
        "hosts": ["a.example.com"],
        **({"tls": tls} if tls else {}),
    }


def test_tls_routes_need_sni_hosts_within_the_virtual_service_hosts() -> None:
    dest = [{"destination": {"host": "db", "port": {"number": 443}}}]
    spec = {"hosts": ["*.example.com"], "gateways": ["gw"]}
    _ok(vs(**spec, tls=[{"match": [{"sniHosts": ["db.example.com"]}], "route": dest}]))
    errors = _errors(vs(**spec, tls=[{"match": [{"sniHosts": ["db.other.org"]}], "route": dest}]))
    assert any(
        "spec.tls[0].match[0].sniHosts[0]: sniHost db.other.org is not a compatible subset" in e
        for e in errors
    ), errors
    errors = _errors(vs(**spec, tls=[{"match": [{"port": 443}], "route": dest}]))
    assert any("spec.tls[0].match[0].sniHosts" in e for e in errors), errors
    errors = _errors(vs(**spec, tls=[{"route": dest}]))
    assert any("spec.tls[0].match" in e for e in errors), errors


def test_gateway_tls_settings_that_are_served() -> None:
    _ok(
        _gateway(
            _server(
                "HTTPS",
                mode="MUTUAL",
                credentialName="a",
                subjectAltNames=["client.example.com"],
                minProtocolVersion="TLSV1_2",
                maxProtocolVersion="TLSV1_3",
                cipherSuites=["ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_RSA_WITH_AES_128_GCM_SHA256"],
            )
        )
    )
    _ok(_gateway(_server("TLS", mode="PASSTHROUGH")))


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        (_server("HTTPS", mode="MUTUAL", serverCertificate="/c", privateKey="/k"),
         "spec.servers[0].tls: MUTUAL TLS requires caCertificates"),
        (_server("HTTPS", mode="SIMPLE"),
         "spec.servers[0].tls: SIMPLE TLS requires credentialName"),
        (_server("HTTPS", mode="ISTIO_MUTUAL"),
         'spec.servers[0].tls.mode: value "ISTIO_MUTUAL" is not supported'),
        (_server("TLS", mode="PASSTHROUGH", credentialName="a"),
         "spec.servers[0].tls.credentialName: PASSTHROUGH does not use certificates"),
        (_server("HTTPS", mode="PASSTHROUGH"),
         "spec.servers[0].tls.mode: PASSTHROUGH is served on"),
        (_server("TLS", mode="SIMPLE", credentialName="a"),
         "spec.servers[0].tls.mode: SIMPLE on a TLS server"),
        (_server("HTTPS", mode="SIMPLE", credentialName="a", cipherSuites=["RC4-MD5"]),
         "spec.servers[0].tls.cipherSuites[0]: cipher suite 'RC4-MD5' is not supported"),
        (_server("HTTPS", mode="SIMPLE", credentialName="a",
                 cipherSuites=["AES128-SHA", "TLS_RSA_WITH_AES_128_CBC_SHA"]),
         "spec.servers[0].tls.cipherSuites[1]: Duplicate value"),
        (_server("HTTPS", mode="SIMPLE", credentialName="a", minProtocolVersion="TLSV1_3",
                 maxProtocolVersion="TLSV1_2"),
         "spec.servers[0].tls.maxProtocolVersion: maxProtocolVersion TLSV1_2 is lower"),
        (_server("HTTPS", mode="SIMPLE", credentialName="a", subjectAltNames=["x"]),
         "spec.servers[0].tls.subjectAltNames: only MUTUAL"),
        (_server("HTTPS", mode="SIMPLE", credentialName="a", minProtocolVersion="TLSV1_1"),
         'spec.servers[0].tls.minProtocolVersion: value "TLSV1_1" is not supported'),
        (_server("GRPC"), 'spec.servers[0].port.protocol: value "GRPC" is not supported'),
        (_server("TCP"), 'spec.servers[0].port.protocol: value "TCP" is not supported'),
        (_server("HTTPS", mode="SIMPLE", credentialName="a", httpsRedirect=True),
         "spec.servers[0].tls.httpsRedirect: httpsRedirect applies to HTTP servers only"),
    ],
)  # fmt: skip
def test_gateway_tls_settings_rejected_by_field_path(server: dict[str, Any], problem: str) -> None:
    errors = _errors(_gateway(server))
    assert any(problem in e for e in errors), errors


def test_authorization_policy() -> None:
    ap = {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "action": "DENY",
            "rules": [
                {
                    "from": [{"source": {"notNamespaces": ["prod"]}}],
                    "to": [{"operation": {"ports": ["8080"], "methods": ["POST"]}}],
                    "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}],
                }
            ],
        },
    }
    _ok(ap)
    ap["spec"]["action"] = "CUSTOM"
    assert '"CUSTOM" is not supported' in _errors(ap)[0]
    ap["spec"]["action"] = "ALLOW"
    ap["spec"]["rules"][0]["to"][0]["operation"]["ports"] = ["http"]
    assert "port must be between 1-65535" in _errors(ap)[0]
    ap["spec"]["rules"][0]["to"][0]["operation"]["ports"] = ["80"]
    ap["spec"]["rules"][0]["when"] = [{"key": "source.ip"}]
    assert "at least one of values or notValues" in _errors(ap)[0]
    ap["spec"]["rules"][0]["when"] = [{"key": "source.colour", "values": ["red"]}]
    assert "unknown attribute" in _errors(ap)[0]
    ap["spec"]["rules"][0]["when"] = []
    ap["spec"]["rules"][0]["from"] = [{"source": {}}]
    assert "must not be empty" in _errors(ap)[0]
    ap["spec"]["rules"][0]["from"] = [{"source": {"ipBlocks": ["10.0.0.300"]}}]
    assert "not an IP address" in _errors(ap)[0]
    ap["spec"]["rules"] = []
    ap["spec"]["targetRef"] = {"kind": "Service", "name": "x"}
    assert "spec.targetRef is not supported" in _errors(ap)[0]


def test_peer_authentication_port_keys_are_normalized_to_strings() -> None:
    doc = _ok(
        {
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "p", "namespace": "prod"},
            "spec": {
                "selector": {"matchLabels": {"app": "x"}},
                "mtls": {"mode": "STRICT"},
                "portLevelMtls": {8080: {"mode": "PERMISSIVE"}},
            },
        }
    )
    assert doc.body["spec"]["portLevelMtls"] == {"8080": {"mode": "PERMISSIVE"}}


def service(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec}


def test_service_defaults_and_rules() -> None:
    doc = _ok(service(selector={"app": "web"}, ports=[{"port": 80}]))
    assert doc.body["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert "clusterIP" not in doc.body["spec"]
    headless = _ok(service(clusterIP="None", selector={"app": "web"}))
    assert headless.body["spec"]["clusterIP"] == "None"
    errors = _errors(service(ports=[{"port": 80}, {"port": 81}]))
    assert "spec.ports[0].name: Required value" in errors[0]
    assert '"UDP" is not supported' in _errors(service(ports=[{"port": 53, "protocol": "UDP"}]))[0]
    assert (
        '"NodePort" is not supported' in _errors(service(type="NodePort", ports=[{"port": 1}]))[0]
    )
    assert "not an IPv4 address" in _errors(service(clusterIP="10.0.0.300", ports=[{"port": 1}]))[0]
    assert "port must be between 1-65535" in _errors(service(ports=[{"port": 0}]))[0]
    bad = service(ports=[{"port": 80}])
    bad["metadata"]["name"] = "Web_1"
    assert "metadata.name: Invalid value" in _errors(bad)[0]


def test_workload_is_stored_by_node_and_uid() -> None:
    wl = {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Workload",
        "metadata": {
            "name": "web-1",
            "namespace": "prod",
            "uid": "abc-123",
            "labels": {"app": "web"},
        },
        "spec": {"node": "node-1", "addresses": ["10.1.0.5"]},
    }
    doc = _ok(wl)
    assert doc.key == keys.workload("node-1", "abc-123")
    assert doc.body["spec"]["serviceAccount"] == "default"
    del wl["metadata"]["uid"]
    assert "metadata.uid: Required value" in _errors(wl)[0]


def test_metadata_rules() -> None:
    doc = vs([{"route": route(None)}])
    doc["metadata"].update(
        {"resourceVersion": "1", "creationTimestamp": "x", "uid": "u", "labels": {"a": "b"}}
    )
    doc["status"] = {"anything": 1}
    ok = _ok(doc, namespace="team")
    assert ok.body["metadata"] == {"name": "reviews", "namespace": "team", "labels": {"a": "b"}}
    assert ok.key == keys.config("VirtualService", "team", "reviews")
    doc["metadata"]["generateName"] = "x-"
    assert "metadata.generateName is not supported" in _errors(doc)[0]
    doc = vs([{"route": route(None)}])
    doc["apiVersion"] = "networking.istio.io/v2"
    assert "apiVersion: Unsupported value" in _errors(doc)[0]
    doc = vs([{"route": route(None)}])
    doc["kind"] = "Sidecar"
    assert "kind Sidecar is not supported (supported: AuthorizationPolicy," in _errors(doc)[0]
    doc["kind"] = "virtualservice"
    assert _errors(doc)[0].endswith(
        "kind virtualservice is not supported (did you mean VirtualService?)"
    )


def test_every_document_error_is_collected() -> None:
    raws = load_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}\n---\n"
        "apiVersion: v1\nkind: Nope\nmetadata: {name: b}\n---\n- just a list\n",
        "multi.yaml",
    )
    docs, errors = validate_batch(raws)
    assert docs == []
    rendered = [str(e) for e in errors]
    assert rendered[0].startswith("multi.yaml:1: Service default/a: spec.ports[0].port")
    assert rendered[1].startswith("multi.yaml:6: Nope default/b: kind Nope is not supported")
    assert rendered[2].startswith("multi.yaml:10: document 3: a document must be an object")


def test_subset_references_are_checked_when_a_rule_is_known() -> None:
    raws = load_text(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n"
        "spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
        "spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v3}}]}]}\n"
        "---\n"
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\n"
        "spec: {hosts: [ratings], http: [{route: [{destination: {host: ratings, subset: v9}}]}]}\n",
        "refs.yaml",
    )
    docs, errors = validate_batch(raws)
    assert errors == []
    problems = [str(e) for e in check_references(docs, {})]
    assert len(problems) == 1, problems
    assert "spec.http[0].route[0].destination.subset" in problems[0]
    assert 'subset "v3" is not defined' in problems[0]
    assert "(defined: v1)" in problems[0]
