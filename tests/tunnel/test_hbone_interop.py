"""HBONE interoperability: Node.js's HTTP/2 client (nghttp2 underneath), not our h2 code, drives
pod B's 15008 server with a workload certificate from the test CA: TLS 1.3 + ALPN h2, CONNECT
to B's app, bytes both ways, END_STREAM half-close (the app answers only after its EOF), the
client pod's IP preserved; a denied identity gets 401. Pod A's netns has no redirection here,
so Node's plain socket reaches B directly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from pki import spiffe
from tunnel_net import (
    A_IP,
    APP_PORT,
    B_ID,
    B_IP,
    Mesh,
    Namespaces,
    build_snapshot,
    config,
    namespaces,
    running_mesh,
    settled,
)

from nodeagent.contract import TUNNEL_PORT

pytestmark = pytest.mark.root
__all__ = ["namespaces"]
SCRIPT = Path(__file__).parent / "hbone_interop.mjs"
NODE = shutil.which("node")


def _allow_sleep_only() -> object:
    return config("AuthorizationPolicy", "allow-sleep", "shop", {"action": "ALLOW", "rules": [
        {"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}
    ]})  # fmt: skip


def _credentials(mesh: Mesh, identity: str, where: Path) -> tuple[Path, Path, Path]:
    cert, key = mesh.identities.ca.issue(identity)
    paths = (where / "cert.pem", where / "key.pem", where / "ca.pem")
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].write_bytes(mesh.identities.ca.pem)
    return paths


async def _node(ns: Namespaces, creds: tuple[Path, Path, Path], payload: str) -> dict[str, object]:
    assert NODE is not None, "node (Node.js 20) is required for the interop test"
    argv = ["ip", "netns", "exec", ns.names[0], NODE, str(SCRIPT), B_IP, str(TUNNEL_PORT)]
    argv += [f"{B_IP}:{APP_PORT}", *map(str, creds), B_ID, payload]
    with trio.fail_after(20):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    result: dict[str, object] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


async def test_node_http2_client_speaks_hbone_to_our_server(
    namespaces: Namespaces, tmp_path: Path
) -> None:
    async with running_mesh(namespaces, redirect_a=False) as mesh:
        mesh.snap[0] = build_snapshot(_allow_sleep_only())
        ok = _credentials(mesh, spiffe("client", "sleep"), tmp_path)
        payload = "ping " * 1000
        result = await _node(namespaces, ok, payload)
        digest = hashlib.sha256(payload.encode()).hexdigest()
        assert result == {"alpn": "h2", "status": 200, "reply": f"{A_IP} {digest}", "error": None}
        assert mesh.app.peers == [A_IP]

        other = tmp_path / "intruder"
        other.mkdir()
        denied = await _node(
            namespaces, _credentials(mesh, spiffe("client", "intruder"), other), "x"
        )
        assert (denied["status"], denied["reply"]) == (401, "")
        assert mesh.app.peers == [A_IP]  # the denied stream never reached the app
        await settled(mesh.b)
        inbound = mesh.b.statistics()["inbound"]
        assert (inbound["opened"], inbound["denied"]) == (2, 1)
