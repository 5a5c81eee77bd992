"""Shared pieces of the sandbox integration tests: the module-scoped sandbox fixture, meshctl
and `apply` through the meshctl binary, the agents' admin socket (`nodeagent.admin.client`),
`eventually()` polling, curl from a pod, a node or the outside host, hey load across an agent
restart, the agents' JSON log records, and the ingress gateway's plain HTTP Gateway."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nodeagent.admin.client import admin_json_sync
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.store import keys, open_store

MESHCTL = str(Path(sys.prefix) / "bin" / "meshctl")


def sandbox_fixture(prefix: str, **options: Any) -> Any:
    """A module-scoped `sandbox` fixture: a 2-node sqlite sandbox unless `options` say otherwise,
    named after `prefix` and the pid (so parallel runs do not collide), always torn down.
    With $MESH_AGENT_IMAGE set (scripts/test's containerised pass), the agents run as
    containers of that image."""

    @pytest.fixture(scope="module")
    def sandbox() -> Iterator[Sandbox]:
        kw: dict[str, Any] = {"nodes": 2, "store": "sqlite", "progress": False, **options}
        if os.environ.get("MESH_AGENT_IMAGE"):
            kw["agent_image"] = os.environ["MESH_AGENT_IMAGE"]
        sb = Sandbox.up(f"{prefix}{os.getpid() % 100000}", **kw)
        try:
            yield sb
        finally:
            sb.down()

    return sandbox


def client_pods(sb: Sandbox) -> tuple[Pod, Pod]:
    """Two pods on n1 in namespace `client`: `sleep` (meshed, service account `sleep`) and
    `outsider` (opted out of the mesh, so it talks plaintext)."""
    client = sb.pod_add("n1", "client", "sleep", ["sleep", "3600"], service_account="sleep")
    outsider = sb.pod_add(
        "n1", "client", "outsider", ["sleep", "3600"], labels={"istio.io/dataplane-mode": "none"}
    )
    return client, outsider


def meshctl(sb: Sandbox, *args: str) -> str:
    done = subprocess.run(
        [MESHCTL, "--store", sb.store_url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, f"meshctl {args}: {done.stdout} {done.stderr}"
    return done.stdout


def apply(sb: Sandbox, d: Path, name: str, docs: list[dict[str, Any]]) -> Path:
    """Writes `docs` to d/<name>.json and applies them; the path serves a later `delete -f`."""
    path = d / f"{name}.json"
    path.write_text("\n---\n".join(json.dumps(x) for x in docs))
    meshctl(sb, "apply", "-f", str(path))
    return path


def apply_file(sb: Sandbox, path: Path) -> None:
    meshctl(sb, "apply", "-f", str(path))


def admin(sb: Sandbox, node: str, path: str) -> Any:
    """The JSON an agent's admin socket answers for `path` (/pods, /certs, /config_dump…)."""
    return admin_json_sync(sb.node(node).admin_socket, path, timeout=5)


def store_revision(sb: Sandbox) -> int:
    """The store's current revision: everything applied so far is at or below it."""

    async def read() -> int:
        store = await open_store(sb.store_url)
        try:
            _, revision = await store.range(keys.ROOT)
        finally:
            await store.aclose()
        return revision

    return trio.run(read)


def wait_config(sb: Sandbox, node: str, timeout: float = 20.0) -> None:
    """Until `node`'s agent serves a snapshot holding everything applied so far. A check on
    answers alone can pass under the old routes (a canary's weights give either version)."""
    revision = store_revision(sb)

    def holds() -> bool:
        snapshot = admin(sb, node, "/config_dump").get("snapshot") or {}
        return int(snapshot.get("revision", 0)) >= revision

    eventually(holds, f"{node}'s agent holds store revision {revision}", timeout)


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.25)  # polling real processes, not a unit test


def curl(sb: Sandbox, target: str | Pod, url: str) -> tuple[int, str]:
    """(curl's exit code, body): non-zero on a refused connection or an HTTP error status."""
    r = sb.exec(target, ["curl", "-sf", "--max-time", "3", url], timeout=10)
    return r.returncode, str(r.stdout)


def http(
    sb: Sandbox, target: str | Pod, url: str, *headers: str, timeout: float = 5
) -> tuple[int, str, float]:
    """(HTTP status or 0, body, seconds) of one request with `headers` ("Name: value")."""
    argv = ["curl", "-s", "--max-time", str(timeout), "-w", "\n%{http_code}", url]
    for h in headers:
        argv += ["-H", h]
    started = time.monotonic()
    r = sb.exec(target, argv, timeout=timeout + 10)
    elapsed = time.monotonic() - started
    body, _, code = str(r.stdout).rpartition("\n")
    return int(code or 0), body, elapsed


def json_lines(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log records of `event` in an agent's log."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            doc = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if doc.get("event") == event:
            out.append(doc)
    return out


def http_gateway(name: str) -> dict[str, Any]:
    """A Gateway `name` (namespace default) for the ingress gateway: port 80, HTTP, any host."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"},
                         "hosts": ["*"]}],
        },
    }  # fmt: skip


def hey_under_load(sb: Sandbox, target: str | Pod, url: str, *flags: str) -> subprocess.Popen[str]:
    """hey from `target` (a pod or "outside"): 10 workers x 25 req/s = 250 req/s for 7 s (hey's
    -q is per worker), e.g. across an agent restart."""
    argv = ["hey", "-z", "7s", "-c", "10", "-q", "25", "-t", "10", *flags, url]
    return sb.popen(target, argv, stdout=-1, stderr=-1, text=True)


HeyOutcome = tuple[int, int, str]


def restart_under_load(
    sb: Sandbox, target: str | Pod, url: str, node: str, *, takeover: bool
) -> tuple[dict[str, HeyOutcome], float]:
    """Two `hey_under_load` from `target` on `url` (keep-alive, and a new connection per
    request) across a restart of `node`'s agent 1.5 s into them: → each load's `hey_outcome`
    ("keep-alive", "new connections") and the seconds `restart_agent` took."""
    keepalive = hey_under_load(sb, target, url)
    fresh = hey_under_load(sb, target, url, "-disable-keepalive")
    try:
        time.sleep(1.5)  # the load runs against the old agent first
        started = time.monotonic()
        sb.restart_agent(node, takeover=takeover)
        restart_s = time.monotonic() - started
        results = {}
        for name, proc in (("keep-alive", keepalive), ("new connections", fresh)):
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, f"hey ({name}): {err}"
            results[name] = hey_outcome(out)
    finally:
        for proc in (keepalive, fresh):
            proc.kill()
            proc.wait()
    return results, restart_s


def hey_outcome(out: str) -> HeyOutcome:
    """(200 responses, every other response or error, hey's error lines)."""
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = (
        re.findall(r"\[(\d+)\]\s+(.+)", out.split("Error distribution:")[-1])
        if ("Error distribution:" in out)
        else []
    )
    failed = sum(n for c, n in codes.items() if c != 200) + sum(int(n) for n, _ in errors)
    return codes.get(200, 0), failed, "; ".join(f"{n}x {e}" for n, e in errors)
