"""mesh-cni chained after the real CNI plugins (loopback, bridge + host-local), as a runtime does.

Everything happens in two network namespaces this test creates (a "node" where the bridge lives
and a "pod"), never in the machine's own; both are deleted even on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cni_fakes import RecordingHandler

from nodeagent.cni.install import DEFAULT_PLUGIN_SOURCE, install_binary
from nodeagent.cni.server import CniServer

pytestmark = pytest.mark.root

CNI_PLUGINS = Path("/usr/lib/cni")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    tag = secrets.token_hex(3)
    node, pod = f"meshcni-node-{tag}", f"meshcni-pod-{tag}"
    created: list[str] = []
    try:
        for name in (node, pod):
            ip("netns", "add", name)
            created.append(name)
        ip("-n", node, "link", "set", "lo", "up")
        yield node, pod
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def conflist(version: str, sock: str, data_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": "meshtest",
        "plugins": [
            {"type": "loopback"},
            {
                "type": "bridge",
                "bridge": "cni-mesh0",
                "isGateway": True,
                "ipam": {
                    "type": "host-local",
                    "subnet": "10.99.0.0/24",
                    "dataDir": str(data_dir),
                },
            },
            {"type": "mesh-cni", "agentSocket": sock, "timeoutSeconds": 10},
        ],
    }


async def run_chain(
    command: str, conf: dict[str, Any], node: str, pod: str, bin_path: str
) -> dict[str, Any] | None:
    """libcni's list semantics: ADD in order passing prevResult; DEL in reverse."""
    plugins = conf["plugins"] if command == "ADD" else list(reversed(conf["plugins"]))
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "ctr-" + pod,
        "CNI_NETNS": f"/var/run/netns/{pod}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": bin_path,
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=u1",
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    result: dict[str, Any] | None = None
    for plugin in plugins:
        stdin = {"cniVersion": conf["cniVersion"], "name": conf["name"], **plugin}
        if result is not None:
            stdin["prevResult"] = result
        exe = next(p for p in bin_path.split(":") if (Path(p) / plugin["type"]).exists())
        with trio.fail_after(30):
            proc = await trio.run_process(
                ["ip", "netns", "exec", node, str(Path(exe) / plugin["type"])],
                stdin=json.dumps(stdin).encode(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
        assert proc.returncode == 0, (plugin["type"], proc.stdout, proc.stderr)
        if command == "ADD":
            result = json.loads(proc.stdout)
    return result


# Debian's containernetworking-plugins speak up to 1.0.0; 1.1.0 is covered in test_cni_plugin.
@pytest.mark.parametrize("version", ["1.0.0", "0.4.0"])
async def test_chain_add_del(
    namespaces: tuple[str, str],
    sock_dir: Path,
    tmp_path: Path,
    nursery: trio.Nursery,
    handler: RecordingHandler,
    version: str,
) -> None:
    node, pod = namespaces
    bin_dir = sock_dir / "bin"
    install_binary(bin_dir, DEFAULT_PLUGIN_SOURCE, sys.executable)
    server = CniServer(sock_dir / "cni.sock", handler)
    await nursery.start(server.run)
    conf = conflist(version, server.socket_path, tmp_path / "ipam")
    bin_path = f"{bin_dir}:{CNI_PLUGINS}"

    result = await run_chain("ADD", conf, node, pod, bin_path)
    assert result is not None
    assert result["cniVersion"] == version
    assert result["ips"][0]["address"].startswith("10.99.0.")
    [(name, req)] = handler.calls
    assert name == "add"
    # The agent sees exactly what the bridge plugin produced.
    assert req.prev_result["ips"] == result["ips"]
    assert req.netns == f"/var/run/netns/{pod}"
    assert req.pod.name == pod

    await run_chain("DEL", conf, node, pod, bin_path)
    assert [name for name, _ in handler.calls] == ["add", "delete"]
