"""The client's pure parts: watch-event decisions, error mapping, kubeconfig, CLI arguments."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from nodeagent.kube.cli import main
from nodeagent.kube.client import ApiStatus, Gone, KubeConfig, KubeError, status_error, with_query
from nodeagent.kube.reflector import WatchError, next_action


def test_next_action() -> None:
    obj = {"metadata": {"name": "a", "resourceVersion": "12"}}
    assert next_action({"type": "ADDED", "object": obj}).op == "upsert"
    assert next_action({"type": "MODIFIED", "object": obj}).resource_version == "12"
    assert next_action({"type": "DELETED", "object": obj}).op == "remove"
    assert next_action({"type": "BOOKMARK", "object": obj}).op == "bookmark"
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
    assert next_action({"type": "ERROR", "object": gone}).op == "relist"
    with pytest.raises(WatchError, match="500 boom"):
        next_action({"type": "ERROR", "object": {"code": 500, "message": "boom"}})
    with pytest.raises(WatchError, match="unknown watch event type 'NOPE'"):
        next_action({"type": "NOPE", "object": obj})
    with pytest.raises(WatchError, match="without an object"):
        next_action({"type": "ADDED"})


def test_status_error_mapping() -> None:
    body = json.dumps({"kind": "Status", "code": 410, "reason": "Expired", "message": "old"})
    err = status_error("GET", "/api/v1/pods", 410, body.encode())
    assert isinstance(err, Gone)
    assert str(err) == "GET /api/v1/pods: HTTP 410 Expired: old"
    err = status_error("PUT", "/x", 409, b"not json")
    assert isinstance(err, ApiStatus)
    assert not isinstance(err, Gone)
    assert err.code == 409
    assert "not json" in str(err)


def test_with_query() -> None:
    assert (
        with_query("/p", {"watch": True, "continue": None, "limit": 5}) == "/p?watch=true&limit=5"
    )
    assert with_query("/p", {"continue": ""}) == "/p"


def test_kubeconfig_token_and_embedded_ca(tmp_path: Path) -> None:
    cfg_file = tmp_path / "config"
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    cfg_file.write_text(
        f"""
apiVersion: v1
kind: Config
current-context: dev
contexts:
- name: dev
  context: {{cluster: c1, user: u1, namespace: team}}
clusters:
- name: c1
  cluster: {{server: "https://10.0.0.1:6443/", certificate-authority-data: "{ca}"}}
users:
- name: u1
  user: {{token: abc}}
"""
    )
    cfg = KubeConfig.from_kubeconfig(cfg_file)
    assert cfg.server == "https://10.0.0.1:6443"
    assert cfg.token == "abc"
    assert cfg.namespace == "team"
    assert cfg.ca_file is not None
    assert Path(cfg.ca_file).read_bytes() == b"-----BEGIN CERTIFICATE-----\n"
    Path(cfg.ca_file).unlink()  # spilled by from_kubeconfig; ours to remove
    with pytest.raises(KubeError, match="no context named 'other'"):
        KubeConfig.from_kubeconfig(cfg_file, "other")


def test_in_cluster_outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="KUBERNETES_SERVICE_HOST is not set"):
        KubeConfig.in_cluster()


def test_cli_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--kinds", "Service,Deployment"]) == 2
    assert "unknown kind 'Deployment'" in capsys.readouterr().err
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["--store", "memory://"]) == 2
    assert "not in a pod?" in capsys.readouterr().err
