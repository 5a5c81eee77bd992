"""meshctl end to end through `main([...])` against a real sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from corpus import corpus_path

from nodeagent.meshctl.main import main


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path}/mesh.db"
    monkeypatch.setenv("MESH_STORE", url)
    monkeypatch.delenv("MESH_VIP_RANGE", raising=False)
    return url


SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: my-app}
spec:
  selector: {app: my-app}
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: None, selector: {app: db}}
"""


def test_canary_with_weights_90_9_is_rejected_and_nothing_is_written(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "canary.yaml"
    bad.write_text(
        corpus_path("seed", "01-canary.yaml").read_text().replace("weight: 10", "weight: 9")
    )
    assert main(["apply", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert (
        f"{bad}:19: VirtualService default/my-app: "
        "spec.http[0].route: weights 90+9=99 must sum to 100" in err
    )
    assert "nothing was applied" in err
    assert main(["get", "gw", "-A"]) == 0
    assert "No Gateway found" in capsys.readouterr().err


def test_seed_examples_apply_and_show(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "-f", str(corpus_path("seed", "01-canary.yaml"))]) == 0
    out = capsys.readouterr().out
    assert "VirtualService default/my-app created" in out
    assert "DestinationRule default/my-app created" in out
    assert main(["apply", "-f", str(corpus_path("seed", "02-fault-delay.yaml"))]) == 0
    assert main(["apply", "-f", str(corpus_path("seed", "01-canary.yaml"))]) == 0
    assert "VirtualService default/my-app unchanged" in capsys.readouterr().out
    # 03 redefines VirtualService default/my-app: applied on its own, it replaces it
    assert main(["apply", "-f", str(corpus_path("seed", "03-ab-user-agent.yaml"))]) == 0
    assert "VirtualService default/my-app configured" in capsys.readouterr().out
    assert main(["get", "virtualservices"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "GATEWAYS", "HOSTS", "REVISION"]
    assert [line.split()[0] for line in table[1:]] == ["my-app", "my-app-fault"]
    assert main(["get", "vs", "my-app", "-o", "yaml"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["spec"]["http"][0]["match"][0]["headers"]["user-agent"] == {"regex": ".*Chrome.*"}


def test_service_vip_allocation_and_get_json(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(SERVICES)
    assert main(["--vip-range", "10.200.0.0/24", "apply", "-f", str(f)]) == 0
    capsys.readouterr()
    assert main(["get", "service", "my-app", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spec"]["clusterIP"] == "10.200.0.2"
    assert doc["spec"]["ports"][0] == {
        "name": "http",
        "port": 80,
        "targetPort": 8080,
        "appProtocol": "http",
        "protocol": "TCP",
    }
    assert main(["get", "svc", "-A", "-o", "wide"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["NAMESPACE", "NAME", "CLUSTER-IP", "PORTS", "SELECTOR", "REVISION"]
    assert rows[1][:5] == ["data", "db", "None", "<none>", "app=db"]
    assert rows[2][:5] == ["default", "my-app", "10.200.0.2", "80/TCP", "app=my-app"]
    assert main(["get", "svc", "-n", "data", "-o", "json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["kind"] == "List"
    assert [i["metadata"]["name"] for i in listing["items"]] == ["db"]


def test_vip_range_from_environment(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESH_VIP_RANGE", "172.30.0.0/28")
    f = tmp_path / "svc.yaml"
    f.write_text(SERVICES)
    assert main(["apply", "-f", str(f)]) == 0
    capsys.readouterr()
    assert main(["get", "svc", "my-app", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["clusterIP"] == "172.30.0.2"
    monkeypatch.setenv("MESH_VIP_RANGE", "not-a-range")
    assert main(["apply", "-f", str(f)]) == 2
    assert "VIP range 'not-a-range'" in capsys.readouterr().err


def test_delete_by_name_and_by_file(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(SERVICES)
    assert main(["apply", "-f", str(f)]) == 0
    assert main(["delete", "svc", "my-app"]) == 0
    assert "Service default/my-app deleted" in capsys.readouterr().out
    assert main(["delete", "svc", "my-app"]) == 1
    assert "Service default/my-app not found" in capsys.readouterr().err
    assert main(["delete", "-f", str(f), "--ignore-not-found"]) == 0
    assert "Service data/db deleted" in capsys.readouterr().out
    assert main(["get", "svc", "-A"]) == 0
    assert "No Service found" in capsys.readouterr().err


def test_validate_needs_no_store_and_reports_every_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESH_STORE", "etcd://127.0.0.1:1")  # never contacted
    f = tmp_path / "mixed.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1alpha3\nkind: WorkloadEntry\nmetadata: {name: w}\n"
        "spec: {address: 1.2.3.4}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
        "spec: {portLevelMtls: {'80': {mode: STRICT}}}\n"
    )
    assert main(["validate", "-f", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:1: WorkloadEntry default/w: kind WorkloadEntry is not supported" in err
    assert (
        f"{f}:6: PeerAuthentication default/p: spec.portLevelMtls: portLevelMtls requires selector"
        in err
    )
    assert main(["validate", "-f", str(corpus_path("seed", "01-canary.yaml"))]) == 0
    assert "Gateway default/http-gateway valid" in capsys.readouterr().out


def test_apply_from_stdin_with_namespace_flag(
    store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr(
        "sys.stdin", io.StringIO(corpus_path("seed", "02-fault-delay.yaml").read_text())
    )
    assert main(["apply", "-n", "team", "-f", "-"]) == 0
    assert "VirtualService team/my-app-fault created" in capsys.readouterr().out
    assert main(["get", "vs", "-n", "team"]) == 0
    assert "my-app-fault" in capsys.readouterr().out


def test_usage_and_load_errors(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "frobnicators"]) == 2
    assert "kind frobnicators is not supported" in capsys.readouterr().err
    assert main(["apply"]) == 2
    capsys.readouterr()
    assert main(["apply", "-f", "/nonexistent/x.yaml"]) == 1
    assert "/nonexistent/x.yaml: no such file or directory" in capsys.readouterr().err
    assert main(["--store", "bogus://x", "get", "svc"]) == 1
    assert "bogus://x" in capsys.readouterr().err


HTTP_ONLY_POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only}
spec:
  rules: [{to: [{operation: {methods: [GET], ports: ["8080"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: DENY
  rules:
  - from: [{source: {requestPrincipals: ["*"]}}]
    when: [{key: "request.auth.claims[groups]", values: [guests]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4-only}
spec:
  rules: [{from: [{source: {namespaces: [default]}}]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt}
spec:
  jwtRules: [{issuer: https://issuer.example.com, jwksUri: https://issuer.example.com/jwks}]
"""


def test_validate_and_apply_warn_about_http_only_fields_on_tcp_ports(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "policies.yaml"
    f.write_text(HTTP_ONLY_POLICIES)
    for command in ("validate", "apply"):
        assert main([command, "-f", str(f)]) == 0
        err = capsys.readouterr().err
        assert (
            f"warning: {f}:1: AuthorizationPolicy default/get-only: "
            "spec.rules[0].to[0].operation.methods needs HTTP: on TCP ports the ALLOW rule "
            "matches nothing there" in err
        )
        assert (
            f"warning: {f}:7: AuthorizationPolicy default/no-admin: "
            "spec.rules[0].from[0].source.requestPrincipals needs HTTP: on TCP ports the DENY "
            "rule is widened" in err
        )
        assert "spec.rules[0].when[0].key (request.auth.claims[groups]) needs HTTP" in err
        assert "l4-only" not in err
        assert "RequestAuthentication" not in err
    assert main(["get", "requestauthentication"]) == 0
    assert "jwt" in capsys.readouterr().out
