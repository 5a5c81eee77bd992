"""`python -m nodeagent.sandbox …` end to end: exit codes, output, and the state it shares."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import pytest

from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.system import netns_list

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "nodeagent.sandbox", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_cli_up_pod_exec_status_down() -> None:
    name = f"t{secrets.token_hex(3)}"
    try:
        _cli("--name", name, "up", "--nodes", "2", "--no-agents", "--no-mesh-cni")
        again = _cli("--name", name, "up", "--nodes", "2", "--no-agents", check=False)
        assert again.returncode != 0
        assert "already exists" in again.stderr

        ip = _cli("--name", name, "pod", "add", "--node", "n2", "--namespace", "shop",
                  "--name", "cart", "--labels", "app=cart,tier=web", "--",
                  "python3", "-m", "http.server", "8080").stdout.strip()  # fmt: skip
        assert ip.startswith("10.201.2.")
        # From node n1 across the underlay to the pod on n2 (once its server has bound).
        curl = [
            "curl",
            "-s",
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://{ip}:8080/",
        ]
        for _ in range(100):
            got = _cli("--name", name, "exec", "node/n1", "--", *curl, check=False).stdout
            if got == "200":
                break
            time.sleep(0.1)
        assert got == "200"
        rc = _cli("--sandbox", name, "exec", "shop/cart", "--", "sh", "-c", "exit 3", check=False)
        assert rc.returncode == 3
        missing = _cli("--name", name, "exec", "nope", "--", "true", check=False)
        assert missing.returncode == 1
        assert "no pod named 'nope'" in missing.stderr

        doc = json.loads(_cli("--name", name, "status", "-o", "json").stdout)
        assert [(p["namespace"], p["name"], p["ip"]) for p in doc["pods"]] == [("shop", "cart", ip)]
        assert [n["underlay_ip"] for n in doc["nodes"]] == ["10.200.0.11", "10.200.0.12"]
        table = _cli("--name", name, "status").stdout
        assert "shop/cart" in table
        assert "10.201.1.0/24" in table
        env = _cli("--name", name, "env").stdout
        assert env.strip() == f"export MESH_STORE=sqlite:///run/nodeagent-sandbox/{name}/mesh.db"
        assert Sandbox.open(name, progress=False).pod("cart").ip == ip

        bad = _cli("--name", name, "pod", "add", "--node", "n1", "--name", "x",
                   "--labels", "novalue", check=False)  # fmt: skip
        assert bad.returncode == 1
        assert "--labels: 'novalue' is not key=value" in bad.stderr

        _cli("--name", name, "pod", "del", "cart", "--namespace", "shop")
        _cli("--name", name, "pod", "del", "cart", "--namespace", "shop")  # idempotent
        _cli("--name", name, "down")
        _cli("--name", name, "down")  # idempotent
        assert not [n for n in netns_list() if n.startswith(f"{name}-")]
        nothing = _cli("--name", name, "status", check=False)
        assert nothing.returncode == 1
        assert "is the sandbox up?" in nothing.stderr
    finally:
        Sandbox(name, progress=False).down()
