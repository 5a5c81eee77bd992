"""Enrollment latency and agent memory: N pods on one sandbox node.

The pods' networks come from the real chain (loopback, bridge, host-local); the bench then calls
the real `mesh-cni` plugin with ADD itself, exactly as a runtime would as the chain's last step,
and times that call from exec to return: plugin start, socket round trip, and the agent's work
(bind listeners, iptables, netlink, store registration). The agent's RSS is read from /proc
before and after, so the per-pod cost is visible.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nodeagent.bench import Result
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.cni import plugin_config

NAME = "enroll"
HELP = "CNI ADD latency (p50/p99) over N pods on one node, and agent RSS with them enrolled"
REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, default=100)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> Result:
    result = Result(NAME, {"pods": args.pods, "nodes": 1})
    sb = Sandbox.up(f"bench{os.getpid() % 10000}", nodes=1, mesh_cni=False, progress=False)
    try:
        agent_pid = sb.node("n1").agent_pid
        assert agent_pid is not None
        rss_before = _rss_mib(agent_pid)
        mesh_conf = {"type": "mesh-cni", "agentSocket": str(sb.node("n1").cni_socket)}
        env_base = {
            "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}",
            "CNI_COMMAND": "ADD",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": f"{REPO / 'cni-plugin'}:/usr/lib/cni",
        }
        samples: list[float] = []
        for i in range(args.pods):
            sb.pod_add("n1", "bench", f"p{i}")
            ps = sb.state().pods[f"bench/p{i}"]
            assert ps.netconf is not None
            env = dict(
                env_base,
                CNI_CONTAINERID=ps.container_id,
                CNI_NETNS=f"/run/netns/{ps.netns}",
                CNI_ARGS=ps.cni_args,
            )
            stdin = plugin_config(ps.netconf, mesh_conf, ps.result)
            t0 = time.perf_counter()
            r = subprocess.run(
                [str(REPO / "cni-plugin" / "mesh-cni")],
                input=stdin,
                env=env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            samples.append((time.perf_counter() - t0) * 1000)
            if r.returncode != 0:
                raise RuntimeError(f"mesh-cni ADD for bench/p{i} failed: {r.stdout!r}")
            if (i + 1) % 20 == 0:
                print(f"enroll: {i + 1}/{args.pods} pods", file=sys.stderr, flush=True)
        rss_after = _rss_mib(agent_pid)
        result.add("ADD p50", statistics.median(samples), "ms")
        result.add("ADD p99", _percentile(samples, 0.99), "ms")
        result.add("ADD max", max(samples), "ms")
        result.add("agent RSS, 0 pods", rss_before, "MiB")
        result.add(f"agent RSS, {args.pods} pods", rss_after, "MiB")
        result.add("agent RSS per pod", (rss_after - rss_before) / args.pods * 1024, "KiB")
    finally:
        sb.down()
    return result
