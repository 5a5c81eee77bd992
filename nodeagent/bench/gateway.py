"""HTTPS at the ingress gateway vs HAProxy terminating TLS, in the same run.

A 2-node sandbox with the gateway on n1 and the bench's HTTP server in a meshed pod on n2. The
gateway serves a SIMPLE HTTPS server on 443 (a P-256 certificate from the sandbox's edge CA),
routed to the pod through the mesh tunnel. HAProxy (one thread, as the agent is one trio
thread) listens in n1's netns on 8443 with the same certificate and forwards plain HTTP to the
pod directly: it does less (no mTLS hop), so the ratios are a bound, not a like-for-like.

The gateway's plain HTTP server on 80 is measured too, so what TLS itself costs shows.
From the outside host, each set-up in turn: `hey -disable-keepalive` (a new TLS connection per
request: handshakes/s) and `wrk` (keep-alive requests/s). Figures: both rates per set-up and
the gateway/HAProxy ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from nodeagent.bench import Result
from nodeagent.config.apply import apply_documents
from nodeagent.config.batch import validate_batch
from nodeagent.config.documents import load_text
from nodeagent.sandbox import Sandbox
from nodeagent.store import open_store

NAME = "gateway"
HELP = "gateway HTTPS: new TLS connections/s and keep-alive requests/s vs HAProxy (ratios)"
POD_PORT = 8080
HAPROXY_PORT = 8443
HOST = "bench.example.com"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=10, help="concurrent clients")


def _haproxy_config(cert_pem: Path, pod_ip: str, listen: str) -> str:
    return f"""global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend https
    bind {listen}:{HAPROXY_PORT} ssl crt {cert_pem} alpn http/1.1
    default_backend pod
backend pod
    http-reuse always
    server pod {pod_ip}:{POD_PORT}
"""


def _hey_rate(text: str) -> float:
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    if m is None:
        raise RuntimeError(f"no Requests/sec in hey output: {text[-300:]!r}")
    return float(m.group(1))


def _wrk_rate(text: str) -> float:
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    if m is None:
        raise RuntimeError(f"no Requests/sec in wrk output: {text[-300:]!r}")
    return float(m.group(1))


def _measure(sb: Sandbox, url: str, args: argparse.Namespace) -> tuple[float, float]:
    duration = f"{args.duration:g}s"
    conns = str(args.connections)
    hey = sb.exec(
        "outside",
        ["hey", "-disable-keepalive", "-c", conns, "-z", duration, "-host", HOST, url],
        timeout=args.duration + 60,
    )
    if hey.returncode != 0:
        raise RuntimeError(f"hey {url}: {hey.stderr}")
    if "[200]" not in str(hey.stdout):
        raise RuntimeError(f"hey {url}: no 200 answers: {str(hey.stdout)[-400:]}")
    wrk = sb.exec(
        "outside",
        ["wrk", "-t1", "-c", conns, "-d", duration, "-H", f"Host: {HOST}", url],
        timeout=args.duration + 60,
    )
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk {url}: {wrk.stderr}")
    if "Non-2xx" in str(wrk.stdout):
        raise RuntimeError(f"wrk {url}: non-2xx answers: {wrk.stdout}")
    return _hey_rate(str(hey.stdout)), _wrk_rate(str(wrk.stdout))


def run(args: argparse.Namespace) -> Result:
    for tool in ("hey", "wrk", "haproxy"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (scripts/bootstrap installs it)")
    result = Result(NAME, {"duration_s": args.duration, "connections": args.connections})
    sb = Sandbox.up(f"bgw{os.getpid() % 10000}", nodes=2, gateway="n1", progress=False)
    work = Path(tempfile.mkdtemp(prefix="nodeagent-bench-gateway-"))
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        pod = sb.pod_add(
            "n2", "bench", "server",
            [sys.executable, "-m", "nodeagent.bench.server", "--http", str(POD_PORT)],
            service_account="bench-server", labels={"app": "bench-server"},
        )  # fmt: skip
        sb.gateway_cert(HOST, "bench")
        cred = sb.gateway_credentials_dir / "bench"
        trio.run(_apply, sb.store_url, _documents())
        gw_ip = sb.node("n1").underlay_ip
        gateway_url = f"https://{gw_ip}:443/"
        _wait_ok(sb, gateway_url)
        pem = work / "haproxy.pem"
        pem.write_bytes((cred / "tls.crt").read_bytes() + (cred / "tls.key").read_bytes())
        pem.chmod(0o600)
        cfg = work / "haproxy.cfg"
        cfg.write_text(_haproxy_config(pem, pod.ip, gw_ip))
        log = (work / "haproxy.log").open("wb")
        haproxy = sb.popen(
            "node/n1", ["haproxy", "-db", "-f", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        haproxy_url = f"https://{gw_ip}:{HAPROXY_PORT}/"
        try:
            _wait_ok(sb, haproxy_url)
        except RuntimeError as exc:
            tail = (work / "haproxy.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{exc}; haproxy: {tail}") from None
        rates = {
            "gateway": _measure(sb, gateway_url, args),
            "haproxy": _measure(sb, haproxy_url, args),
            "gateway-plain-http": _measure(sb, f"http://{gw_ip}:80/", args),
        }
        for setup, (handshakes, keepalive) in rates.items():
            result.rows.append(
                {
                    "setup": setup,
                    "new_tls_conns_per_s": handshakes,
                    "keepalive_req_per_s": keepalive,
                }
            )
            result.add(f"{setup}_new_connections", handshakes, "conn/s")
            result.add(f"{setup}_keepalive_requests", keepalive, "req/s")
        result.add("ratio_new_tls_connections", rates["gateway"][0] / rates["haproxy"][0], "x")
        result.add("ratio_keepalive_requests", rates["gateway"][1] / rates["haproxy"][1], "x")
        # What TLS costs the gateway itself: HTTPS over its own plain-HTTP rate.
        plain = rates["gateway-plain-http"]
        result.add("gateway_tls_vs_plain_new_connections", rates["gateway"][0] / plain[0], "x")
        result.add("gateway_tls_vs_plain_keepalive", rates["gateway"][1] / plain[1], "x")
        result.notes.append(
            "gateway: TLS termination + HTTP/1.1 proxy + mTLS tunnel to the pod; HAProxy: TLS "
            "termination + plain HTTP to the pod (no mesh hop): ratios are a lower bound"
        )
        return result
    finally:
        if haproxy is not None and haproxy.poll() is None:
            haproxy.send_signal(signal.SIGTERM)
            try:
                haproxy.wait(timeout=5)
            except subprocess.TimeoutExpired:
                haproxy.kill()
                haproxy.wait(timeout=5)
        sb.down()
        shutil.rmtree(work, ignore_errors=True)


async def _apply(store_url: str, text: str) -> None:
    docs, errors = validate_batch(load_text(text, "bench-gateway"), "bench")
    if errors:
        raise RuntimeError(f"bench config invalid: {errors}")
    store = await open_store(store_url)
    try:
        await apply_documents(store, docs)
    finally:
        await store.aclose()


def _documents() -> str:
    return """apiVersion: v1
kind: Service
metadata: {name: bench-server, namespace: bench}
spec:
  selector: {app: bench-server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bench, namespace: bench}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, credentialName: bench}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bench, namespace: bench}
spec:
  hosts: ["*"]
  gateways: [bench]
  http:
  - route: [{destination: {host: bench-server, port: {number: 80}}}]
"""


def _wait_ok(sb: Sandbox, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = sb.exec(
            "outside",
            ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url],
            timeout=10,
        )
        if str(r.stdout) == "200":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} does not answer 200 after {timeout:g}s ({r.stdout})")
        time.sleep(0.3)
