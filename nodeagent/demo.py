"""`scripts/demo`: the product's story on a 2-node sandbox with the embedded store.

Each step says what it shows, runs the real thing, and checks it; the demo exits non-zero when a
step does not behave, and tears the sandbox down on the way out (also on Ctrl-C).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nodeagent.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
MESHCTL = str(Path(sys.prefix) / "bin" / "meshctl")
NAME = "demo"


class StepFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(argv: list[str], *, env: dict[str, str] | None = None, ok: bool = True) -> str:
    print("$ " + " ".join(argv), flush=True)
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if (r.returncode == 0) != ok:
        raise StepFailed(f"{' '.join(argv)} exited {r.returncode}, expected {'0' if ok else '≠0'}")
    return out


def admin(sb: Sandbox, node: str, path: str) -> Any:
    r = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(sb.node(node).admin_socket), f"http://agent{path}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return json.loads(r.stdout)


def run() -> None:
    if not CORPUS.is_dir():
        raise StepFailed(f"the corpus is missing at {CORPUS}")
    say("A 2-node sandbox: network namespaces, an underlay bridge, one agent per node")
    sb = Sandbox.up(NAME, nodes=2, store="sqlite")
    try:
        env = dict(os.environ, MESH_STORE=sb.store_url)
        print(f"store: {sb.store_url}")

        say("Istio's own YAML: the article's canary release validates and applies atomically")
        show([MESHCTL, "apply", "-f", str(CORPUS / "seed" / "01-canary.yaml")], env=env)
        show([MESHCTL, "get", "virtualservice", "-A"], env=env)

        say("Weights that do not sum to 100 are refused, naming the weights; nothing is written")
        bad = (CORPUS / "seed" / "01-canary.yaml").read_text().replace("weight: 10", "weight: 9")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(bad)
        try:
            out = show([MESHCTL, "apply", "-f", f.name], env=env, ok=False)
        finally:
            os.unlink(f.name)
        if "90+9=99" not in out:
            raise StepFailed("the rejection does not name the weights")

        say("Pods join the mesh through the real CNI chain (loopback, bridge, mesh-cni)")
        app = sb.pod_add(
            "n2",
            "default",
            "my-app-v1",
            ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"],
            labels={"app": "my-app", "version": "v1.0.0"},
            service_account="my-app",
        )
        client = sb.pod_add("n1", "default", "client", ["sleep", "3600"], service_account="client")
        show(["ip", "netns", "exec", client.netns, "iptables-legacy-save", "-t", "nat"])

        say(f"The client (n1, {client.ip}) calls my-app (n2, {app.ip}): both agents carry it")
        deadline = time.monotonic() + 10
        while True:
            r = sb.exec(
                client.key,
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{app.ip}:8080/"],
            )
            if r.stdout == "200" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        print(f"  HTTP {r.stdout}")
        if r.stdout != "200":
            raise StepFailed(f"client → my-app answered {r.stdout!r}: {r.stderr}")
        out_stats = _pod(admin(sb, "n1", "/pods"), "client")["connections"]["outbound"]
        in_stats = _pod(admin(sb, "n2", "/pods"), "my-app-v1")["connections"]["inbound"]
        print(f"  {'agent':<8}{'pod':<12}{'direction':<11}{'connections':>12}{'bytes in':>10}")
        print(
            f"  {'n1':<8}{'client':<12}{'outbound':<11}{out_stats['opened']:>12}"
            f"{out_stats['bytes_received']:>10}"
        )
        print(
            f"  {'n2':<8}{'my-app-v1':<12}{'inbound':<11}{in_stats['opened']:>12}"
            f"{in_stats['bytes_sent']:>10}"
        )
        if out_stats["opened"] < 1 or in_stats["opened"] < 1:
            raise StepFailed("a connection was not captured by both agents")
        seen = f"{client.ip} - -" in app.log.read_text()
        print(f"  my-app saw the caller as {client.ip}: {'yes' if seen else 'NO'}")
        if not seen:
            raise StepFailed("the application did not see the client pod's address")
        say("Done: everything above ran for real; tearing the sandbox down")
    finally:
        sb.down()


def _pod(pods: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for p in pods:
        if p["name"] == name:
            return p
    raise StepFailed(f"pod {name} is not enrolled: {[p['name'] for p in pods]}")


def main() -> int:
    try:
        run()
    except StepFailed as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    print("\ndemo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
