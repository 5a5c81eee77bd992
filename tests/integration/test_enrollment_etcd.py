"""The mesh across machines: agents in two node namespaces share a real etcd on the underlay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mesh_helpers import eventually

from nodeagent.sandbox import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.etcd]


def test_two_nodes_on_etcd_register_and_carry_traffic() -> None:
    sb = Sandbox.up(f"et{os.getpid() % 100000}", nodes=2, store="etcd", progress=False)
    try:
        assert sb.store_url == "etcd://10.200.0.2:2379"
        srv = sb.pod_add("n2", "default", "srv", ["python3", "-m", "http.server", "8080"])
        cli = sb.pod_add("n1", "default", "cli", ["sleep", "600"])
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{srv.ip}:8080/"]
        eventually(lambda: sb.exec(cli.key, curl).stdout == "200", "cli → srv answers 200", 10)
        meshctl = str(Path(sys.prefix) / "bin" / "meshctl")
        out = sb.exec(
            "node/n1",
            [meshctl, "--store", sb.store_url, "get", "workloads", "-A", "-o", "json"],
            check=True,
        ).stdout
        docs = json.loads(out)
        items = docs["items"] if isinstance(docs, dict) else docs
        nodes = {d["metadata"]["name"]: d["spec"]["node"] for d in items}
        assert nodes == {"srv": "n2", "cli": "n1"}
    finally:
        sb.down()
    assert not [
        line
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line.startswith(sb.name)
    ]
