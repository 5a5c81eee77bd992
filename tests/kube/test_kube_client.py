"""The client's pure parts (watch-event decisions, error mapping, kubeconfig, CLI arguments) and
its transport failures against real loopback servers, each a KubeError naming the request."""

from __future__ import annotations

import base64
import json
import socket
from functools import partial
from pathlib import Path

import pytest
import trio

from nodeagent.kube.cli import main
from nodeagent.kube.client import (
    ApiStatus,
    Gone,
    KubeClient,
    KubeConfig,
    KubeError,
    status_error,
    with_query,
)
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


async def answering(nursery: trio.Nursery, answer: bytes) -> int:
    """A loopback server that reads a request head, writes `answer` verbatim and closes."""

    async def handler(stream: trio.abc.Stream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf and (data := await stream.receive_some(1 << 16)):
            buf += data
        await stream.send_all(answer)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", r"^GET /api/v1/pods: the API server closed the connection before answering$"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", r"^GET /api/v1/pods: bad HTTP from the API server: "),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}",
            r"^GET /api/v1/pods: the API server closed the connection mid-response",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", r"^GET /api/v1/pods: expected a JSON"),
    ],
)
async def test_transport_failures(nursery: trio.Nursery, answer: bytes, message: str) -> None:
    port = await answering(nursery, answer)
    client = KubeClient(KubeConfig(f"http://127.0.0.1:{port}"), timeout=5.0)
    with pytest.raises(KubeError, match=message):
        await client.request("GET", "/api/v1/pods")


async def test_connect_failure_names_the_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = KubeClient(KubeConfig(f"http://127.0.0.1:{port}"), timeout=5.0)
    with pytest.raises(KubeError, match=rf"^GET /x: connect http://127.0.0.1:{port}: .*refused"):
        await client.request("GET", "/x")


async def test_watch_error_status_and_bad_stream(nursery: trio.Nursery) -> None:
    gone = json.dumps({"kind": "Status", "reason": "Expired", "message": "too old"}).encode()
    port = await answering(
        nursery, b"HTTP/1.1 410 Gone\r\nContent-Length: %d\r\n\r\n" % len(gone) + gone
    )
    client = KubeClient(KubeConfig(f"http://127.0.0.1:{port}"), timeout=5.0)
    with pytest.raises(Gone, match="HTTP 410 Expired: too old"):
        async with client.watch("/w", idle=5.0):
            pass
    port = await answering(
        nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b'{"type": "ADDED"}\n'
    )
    client = KubeClient(KubeConfig(f"http://127.0.0.1:{port}"), timeout=5.0)
    async with client.watch("/w", idle=5.0) as events:
        assert await events.__anext__() == {"type": "ADDED"}
        with pytest.raises(KubeError, match=r"^GET /w: the API server closed the connection mid"):
            await events.__anext__()
