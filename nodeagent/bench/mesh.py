"""The data-plane bench: direct vs this mesh vs an HAProxy pipeline, on a 2-node sandbox.

Pods: on n2 a meshed server (`app=bench-server`, behind the Service `bench/bench-server`) and an
opted-out one (`istio.io/dataplane-mode=none`); on n1 a meshed client and an opted-out one. The
three set-ups, measured back to back for every scenario and load so they share the machine's load:

- direct: opted-out client → opted-out server pod IP (pod to pod, untouched);
- mesh: meshed client → the Service VIP (applied with the config API, plus a VirtualService for
  the HTTP scenario): whatever the sandbox's agents do today carries it (plain TCP relay, later
  mTLS through 15008), so a new data plane is measured with no change here. If the agents do not
  route the VIP yet, the meshed server's pod IP is used instead, and the run says so;
- haproxy: opted-out client → HAProxy in n1's netns → mutual TLS → HAProxy in n2's netns →
  opted-out server (`nodeagent.bench.haproxy`).

Scenarios: `l4` (64-byte request/response on persistent connections), `connect` (a new connection
per request), `churn` (the same, sustained: `--churn-rate` for `--churn-duration`, 1,000/s for
30 s by default, so the TIME_WAITs, port reuse and queues of production churn build up as the
3 s runs never let them; a request still unanswered 10 s after the run counts as failed),
`http` (HTTP/1.1 keep-alive GET through a routing rule; both agents parse it: the
source routes, the destination authenticates and authorizes), `http-l4` (the same requests to the
same server on a Service port named `tcp-web`: both agents relay at L4; mesh set-up only, so
`http` minus `http-l4` is what L7 costs, and the server's agent's CPU difference is the
destination's share), `h2` (HTTP/2 GETs of nginx's 1 KB file, h2c with prior knowledge,
`h2load` with 10 streams per connection), `grpc` (gRPC unary calls of 64 bytes to a grpcio
server, `h2load` posting a framed message), `bulk` (MB/s). For `h2` and `grpc` the HAProxy hops
speak HTTP/2 (mode http, ALPN h2 between them), and h2load reports a mean latency, no
percentiles. The HTTP
server is the anchors' workload by default (`--server nginx`: Debian's nginx serving a 1 KB
static file, `nginx.py`), or the built-in 2-byte responder (`--server builtin`). Loads: fixed
rates with coordinated-omission correction (`loadgen`), and a max-rate run (loadgen closed-loop
for L4, wrk for HTTP). Around every measurement both agents' and both HAProxies' CPU time (and
the agents' RSS) are read from /proc, so CPU per 1,000 requests is a mesh/HAProxy ratio from one
run, beside ztunnel's and the waypoint's published vCPU per 1,000 req/s (`REFERENCE_VCPU_PER_1K`).
Then config propagation (apply → every agent's snapshot at that revision, via `/config_dump`) and
enrollment latency (the `enroll` bench) are measured.

`--restart` adds agent restarts under constant load (last, since the agents' pids change): HTTP
at `--restart-rate` (500/s; half keep-alive, half a new connection per request, `hey`) from the
meshed client to the Service while each node's agent is restarted gracefully
(`Sandbox.restart_agent`: SIGTERM, the new agent binds beside the draining old one), then killed
with -9 and started again; failed requests and p99 for each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from nodeagent.admin.client import admin_json
from nodeagent.bench import Result, grpc_server, nginx
from nodeagent.bench import enroll as enroll_bench
from nodeagent.bench.haproxy import HAProxyPipeline, Hop
from nodeagent.bench.stats import percentile
from nodeagent.config.apply import apply_documents
from nodeagent.config.batch import validate_batch
from nodeagent.config.documents import load_text
from nodeagent.proxy.inbound import DESTINATION_L7_MODES
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.store import open_store

NAME = "mesh"
HELP = "latency, max rate, throughput, agent CPU/RSS: direct vs this mesh vs HAProxy (sandbox)"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "docs" / "benchmarks.json"
SCENARIOS = ("l4", "connect", "churn", "http", "http-l4", "h2", "grpc", "bulk")
SETUPS = ("direct", "mesh", "haproxy")
NS = "bench"
SERVICE = "bench-server"
HOST = f"{SERVICE}.{NS}.svc.cluster.local"
# "http-l4": the same HTTP server behind a Service port named `tcp-web`: neither agent parses it
# (the `http-l4` scenario, the L7-off half of the destination L7 comparison).
PORTS = {"echo": 7000, "http": 8080, "bulk": 7001, "http-l4": 8081, "h2": 8082, "grpc": 8083}
HAPROXY_PORTS = {"echo": 17000, "http": 18080, "bulk": 17001, "h2": 18082, "grpc": 18083}
H2_SCENARIOS = ("h2", "grpc")  # h2load: HTTP/2 GETs of nginx's 1 KB file; gRPC unary calls
H2_STREAMS = 10  # concurrent streams per h2load connection
OPT_OUT = {"istio.io/dataplane-mode": "none"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = ("nginx", "builtin")
# Istio's published figures (istio.io "Performance and Scalability", 1 KB HTTP/1.1 through nginx):
# vCPU per 1,000 requests/s of one ztunnel (L4) and of one waypoint (HTTP).
REFERENCE_VCPU_PER_1K = {"ztunnel": 0.06, "waypoint": 0.25}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per run")
    parser.add_argument("--rates", default="100,1000", help="fixed rates, requests/s")
    parser.add_argument("--no-max", action="store_true", help="skip the max-rate runs")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="subset of " + ",".join(SCENARIOS)
    )
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="nginx",
        help="HTTP server in the server pods: nginx with a 1 KB file (the anchors' workload), "
        "or the built-in 2-byte responder",
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--churn-rate", type=float, default=1000.0, help="churn: new connections/s")
    parser.add_argument(
        "--churn-duration", type=float, default=30.0, help="churn: measured seconds"
    )
    parser.add_argument("--size", type=int, default=64, help="request/response bytes")
    parser.add_argument("--bulk-mib", type=int, default=128, help="MiB per bulk transfer")
    parser.add_argument("--bulk-transfers", type=int, default=3)
    parser.add_argument("--propagation-samples", type=int, default=20)
    parser.add_argument("--enroll-pods", type=int, default=20, help="0 skips the enroll bench")
    parser.add_argument(
        "--restart", action="store_true", help="also: agent restarts under constant load"
    )
    parser.add_argument("--restart-rate", type=float, default=500.0, help="requests/s")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="every agent's `nodeagent run --workers` (data-plane processes; CPU and RSS "
        "figures cover the agent and its workers)",
    )
    parser.add_argument(
        "--destination-l7",
        default="always",
        choices=list(DESTINATION_L7_MODES),
        help="every agent's `nodeagent run --destination-l7` (whether n2 parses the requests "
        "n1's L7 proxy reports)",
    )
    parser.add_argument("--name", default="", help="sandbox name (default: mb<pid>)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file ('' for none)")
    parser.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="sample both agents with py-spy (on PATH or in .venv) during every mesh run and "
        "write collapsed stacks to DIR (skews the CPU figures: for profiling, not reporting)",
    )


def say(msg: str) -> None:
    print(f"mesh: {msg}", file=sys.stderr, flush=True)


# ----- /proc and the admin socket ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (stat fields 14 and 15), seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (an agent's `--workers` processes among them)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU of `pid`, its reaped children (cutime + cstime: a worker that exited) and its live
    children (the workers): an agent's CPU whatever `--workers` says."""
    fields = _stat(pid)
    total = sum(int(f) for f in fields[11:15]) / CLK_TCK
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


def sys_seconds(pid: int) -> float:
    """stime of `pid` alone: the kernel's share (syscalls, the TCP stack, softirqs)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[12]) / CLK_TCK


def tree_sys_seconds(pid: int) -> float:
    """stime of `pid` and its children, reaped and live (see `tree_cpu_seconds`)."""
    fields = _stat(pid)
    total = (int(fields[12]) + int(fields[14])) / CLK_TCK
    for child in children(pid):
        try:
            total += sys_seconds(child)
        except OSError:
            continue
    return total


def tree_rss_mib(pid: int) -> float:
    """RSS of `pid` and its live children, summed (pages they share count once per process)."""
    total = rss_mib(pid)
    for child in children(pid):
        try:
            total += rss_mib(child)
        except (OSError, RuntimeError):
            continue
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


# ----- config ------------------------------------------------------------------------------------


def config_yaml(sample: int = 0) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {SERVICE}, namespace: {NS}}}
spec:
  selector: {{app: {SERVICE}}}
  ports:
  - {{name: tcp-echo, port: {PORTS["echo"]}}}
  - {{name: http, port: {PORTS["http"]}}}
  - {{name: tcp-bulk, port: {PORTS["bulk"]}}}
  - {{name: tcp-web, port: {PORTS["http-l4"]}}}
  - {{name: http2, port: {PORTS["h2"]}}}
  - {{name: grpc, port: {PORTS["grpc"]}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {SERVICE}, namespace: {NS}}}
spec:
  hosts: [{SERVICE}]
  http:
  - name: bench
    match: [{{uri: {{prefix: /}}, port: {PORTS["http"]}}}]
    headers: {{response: {{set: {{x-bench-sample: "{sample}"}}}}}}
    route: [{{destination: {{host: {SERVICE}, port: {{number: {PORTS["http"]}}}}}}}]
  - name: bench-h2
    match: [{{port: {PORTS["h2"]}}}]
    route: [{{destination: {{host: {SERVICE}, port: {{number: {PORTS["h2"]}}}}}}}]
  - name: bench-grpc
    match: [{{port: {PORTS["grpc"]}}}]
    route: [{{destination: {{host: {SERVICE}, port: {{number: {PORTS["grpc"]}}}}}}}]
"""


async def apply_config(store_url: str, sample: int = 0) -> tuple[int, str]:
    """Apply the Service + VirtualService; returns (store revision, the Service's VIP)."""
    docs, errors = validate_batch(load_text(config_yaml(sample), "bench"), NS)
    if errors:
        raise RuntimeError(f"bench config invalid: {errors}")
    store = await open_store(store_url)
    try:
        result = await apply_documents(store, docs)
    finally:
        await store.aclose()
    vip = next(o.doc.body["spec"]["clusterIP"] for o in result.outcomes if o.doc.kind == "Service")
    return result.revision, str(vip)


async def wait_revision(sockets: list[Path], revision: int, limit: float = 10.0) -> float:
    """Poll every agent's `/config_dump` until its snapshot is at `revision`; seconds waited."""
    t0 = time.perf_counter()
    pending = list(sockets)
    with trio.fail_after(limit):
        while pending:
            for sock in list(pending):
                dump = await admin_json(sock, "/config_dump")
                if (dump.get("snapshot") or {}).get("revision", 0) >= revision:
                    pending.remove(sock)
            if pending:
                await trio.sleep(0.001)
    return time.perf_counter() - t0


async def measure_propagation(sb: Sandbox, samples: int) -> list[float]:
    sockets = [n.admin_socket for n in sb.nodes()]
    out: list[float] = []
    for i in range(samples):
        t0 = time.perf_counter()
        revision, _ = await apply_config(sb.store_url, sample=i + 1)
        await wait_revision(sockets, revision)
        out.append((time.perf_counter() - t0) * 1000)
    return out


# ----- running the load ---------------------------------------------------------------------------


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s and the latency distribution (ms) out of `wrk --latency` output."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if rate is None:
        raise ValueError(f"no Requests/sec in wrk output: {text[-300:]!r}")
    lat: dict[str, float] = {}
    for q, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[f"p{q}"] = float(value) * _WRK_UNITS[unit]
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m)", text, re.M)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "achieved_rate": float(rate.group(1)),
        "requests": int(total.group(1)) if total else 0,
        "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
        "latency_ms": lat,
    }


class Runner:
    def __init__(self, sb: Sandbox, args: argparse.Namespace) -> None:
        self.sb = sb
        self.args = args
        self.agents = {n.name: n.agent_pid for n in sb.nodes()}
        for name, pid in self.agents.items():
            if pid is None:
                raise RuntimeError(f"the agent of {name} is not running")
        self.haproxy: HAProxyPipeline | None = None

    def _proc_cpu(self) -> dict[str, float]:
        out = {f"agent_{n}": tree_cpu_seconds(pid) for n, pid in self.agents.items() if pid}
        out.update(
            {f"agentsys_{n}": tree_sys_seconds(pid) for n, pid in self.agents.items() if pid}
        )
        if self.haproxy is not None:
            for side in ("n1", "n2"):
                out[f"haproxy_{side}"] = cpu_seconds(self.haproxy.pid(side))
        return out

    def _start_profile(self, label: str) -> list[subprocess.Popen[bytes]]:
        """py-spy on both agents until `_stop_profile` (why a subprocess per agent: py-spy
        samples one pid; `--nonblocking` so the agents are not paused while sampled)."""
        profile = getattr(self.args, "profile", "")
        if not profile:
            return []
        spy = py_spy()
        out = Path(profile)
        out.mkdir(parents=True, exist_ok=True)
        return [
            subprocess.Popen(
                [
                    spy, "record", "--nonblocking", "--format", "raw", "--rate", "500",
                    "--pid", str(pid), "--output", str(out / f"{label}-{node}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for node, pid in self.agents.items()
            if pid
        ]  # fmt: skip

    @staticmethod
    def _stop_profile(spies: list[subprocess.Popen[bytes]]) -> None:
        for proc in spies:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in spies:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def measure(
        self, setup: str, scenario: str, load: str, client: Pod, argv: list[str], timeout: float
    ) -> dict[str, Any]:
        spies = (
            self._start_profile(f"{scenario}-{load.replace('/', '')}") if setup == "mesh" else []
        )
        before = self._proc_cpu()
        t0 = time.perf_counter()
        try:
            r = self.sb.exec(client, argv, timeout=timeout)
        finally:
            wall = time.perf_counter() - t0
            after = self._proc_cpu()
            self._stop_profile(spies)
        if argv[0] == "wrk":
            if r.returncode != 0:
                raise RuntimeError(f"wrk ({setup} {scenario}) exited {r.returncode}: {r.stderr}")
            out = parse_wrk(r.stdout)
            out["duration"] = self.args.duration
        elif argv[0] == "h2load":
            if r.returncode != 0:
                raise RuntimeError(f"h2load ({setup} {scenario}) exited {r.returncode}: {r.stderr}")
            out = parse_h2load(r.stdout)
            out["duration"] = self.args.duration
        else:
            try:
                out = json.loads(r.stdout.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                raise RuntimeError(
                    f"loadgen ({setup} {scenario} {load}) rc={r.returncode}: {r.stdout} {r.stderr}"
                ) from None
            if "error" in out:
                raise RuntimeError(f"loadgen ({setup} {scenario} {load}): {out['error']}")
        delta = {k: after[k] - before.get(k, after[k]) for k in after}
        agent_cpu = sum(v for k, v in delta.items() if k.startswith("agent_"))
        haproxy_cpu = sum(v for k, v in delta.items() if k.startswith("haproxy_"))
        requests = int(out.get("requests", 0))
        lat = out.get("latency_ms") or {}
        row: dict[str, Any] = {
            "scenario": scenario,
            "load": load,
            "setup": setup,
            "requests": requests,
            "errors": int(out.get("errors", 0)),
            "rate": round(float(out.get("achieved_rate", 0.0)), 1),
            "p50_ms": lat.get("p50"),
            "p90_ms": lat.get("p90"),
            "p99_ms": lat.get("p99"),
            "p99.9_ms": lat.get("p99.9"),
            "mean_ms": lat.get("mean"),
            "max_ms": lat.get("max"),
            "send_lag_ms": out.get("send_lag_ms"),
            "mb_per_s": out.get("mb_per_s"),
            "wall_s": round(wall, 2),
            "agent_cpu_s": round(agent_cpu, 3),
            # Per node: n1 is the client's (source) agent, n2 the server's (destination).
            "agent_cpu_s_by_node": {
                k.removeprefix("agent_"): round(v, 3)
                for k, v in delta.items()
                if k.startswith("agent_")
            },
            "agent_sys_s": round(sum(v for k, v in delta.items() if k.startswith("agentsys_")), 3),
            "haproxy_cpu_s": round(haproxy_cpu, 3) if setup == "haproxy" else None,
            "agent_rss_mib": {
                n: round(tree_rss_mib(pid), 1) for n, pid in self.agents.items() if pid
            },
            "first_error": out.get("first_error"),
        }
        # The CPU delta also covers the unmeasured warm-up: count the requests sent in it too.
        measured = float(out.get("duration") or 0.0)
        span = measured + (0.0 if argv[0] == "wrk" else self.args.warmup)
        covered = requests * span / measured if measured else 0
        row["requests_covered"] = round(covered)
        if setup == "mesh" and covered:
            row["agent_cpu_ms_per_req"] = round(agent_cpu / covered * 1000, 4)
        if setup == "haproxy" and covered:
            row["haproxy_cpu_ms_per_req"] = round(haproxy_cpu / covered * 1000, 4)
        say(
            f"{scenario:<8} {load:>7} {setup:<8} "
            + (
                f"{row['mb_per_s']:.0f} MB/s"
                if row["mb_per_s"]
                else f"{row['rate']:>9.0f} req/s  p50 {_ms(row['p50_ms'])}  p90 "
                f"{_ms(row['p90_ms'])}  p99 {_ms(row['p99_ms'])}  errors {row['errors']}"
            )
        )
        return row


def py_spy() -> str:
    """The py-spy that `--profile` runs (PATH, else beside this interpreter); SystemExit naming
    it when absent, so a run asked to profile fails before its sandbox starts."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit(
            f"scripts/bench mesh: --profile needs py-spy (not at {spy}): pip install py-spy"
        )
    return spy


def _ms(v: object) -> str:
    return f"{v:.3f} ms" if isinstance(v, float) else "-"


def h2load_argv(
    scenario: str, url: str, args: argparse.Namespace, rate: float, grpc_request: Path
) -> list[str]:
    """h2load for `h2` (GET /) or `grpc` (POST a framed unary request); `rate` 0 is max."""
    clients = max(1, min(args.connections, 4)) if rate else args.connections
    argv = [
        "h2load", "-c", str(clients), "-m", "1" if rate else str(H2_STREAMS),
        "-D", f"{args.duration:g}", "--warm-up-time", f"{round(args.warmup * 1000)}ms",
    ]  # fmt: skip
    if rate:
        argv += ["--rps", f"{rate / clients:g}"]
    if scenario == "grpc":
        argv += ["-d", str(grpc_request), "-H", "content-type: application/grpc",
                 "-H", "te: trailers", f"{url}{grpc_server.METHOD}"]  # fmt: skip
    else:
        argv.append(f"{url}/")
    return argv


_H2LOAD_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_h2load(text: str) -> dict[str, Any]:
    """Requests/s, counts and the mean request time (ms) out of h2load's summary."""
    rate = re.search(r"^finished in [\d.]+\w+, ([\d.]+) req/s", text, re.M)
    counts = re.search(
        r"^requests: (\d+) total.*?(\d+) succeeded, (\d+) failed, (\d+) errored", text, re.M
    )
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if rate is None or counts is None:
        raise ValueError(f"no summary in h2load output: {text[-300:]!r}")
    lat: dict[str, float] = {}
    req = re.search(
        r"^time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)",
        text,
        re.M,
    )
    if req is not None:
        lat["mean"] = float(req.group(5)) * _H2LOAD_UNITS[req.group(6)]
        lat["max"] = float(req.group(3)) * _H2LOAD_UNITS[req.group(4)]
    not_2xx = sum(int(n) for n in codes.groups()[1:]) if codes else 0
    return {
        "achieved_rate": float(rate.group(1)),
        "requests": int(counts.group(2)),
        "errors": int(counts.group(3)) + int(counts.group(4)) + not_2xx,
        "latency_ms": lat,
    }


def loadgen_argv(
    mode: str, target: str, args: argparse.Namespace, rate: float, duration: float = 0.0
) -> list[str]:
    return [
        sys.executable, "-m", "nodeagent.bench.loadgen", mode, target, "--rate", f"{rate:g}",
        "--duration", f"{duration or args.duration:g}", "--warmup", f"{args.warmup:g}",
        "--connections", str(args.connections), "--size", str(args.size), "--http-host", HOST,
    ]  # fmt: skip


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": _first_line(["haproxy", "-v"]),
    }


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "absent"
    return (r.stdout.splitlines() or ["?"])[0]


# ----- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Result:
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"scripts/bench mesh: unknown scenario(s) {unknown}; known: {SCENARIOS}")
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if getattr(args, "profile", ""):
        py_spy()
    result = Result(
        NAME,
        {
            "duration_s": args.duration,
            "rates": args.rates,
            "connections": args.connections,
            "size": args.size,
            "scenarios": ",".join(scenarios),
            "server": getattr(args, "server", "nginx"),
            "workers": getattr(args, "workers", 1),
            "destination_l7": getattr(args, "destination_l7", "always"),
        },
    )
    if "churn" in scenarios:
        result.parameters["churn"] = f"{args.churn_rate:g}/s for {args.churn_duration:g} s"
    result.meta = {
        "machine": machine(),
        "command": "scripts/bench " + shlex.join(getattr(args, "argv", None) or [NAME]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    name = args.name or f"mb{os.getpid() % 100000}"
    say(f"sandbox {name}: 2 nodes, 4 pods")
    started = time.perf_counter()
    sb = Sandbox.up(
        name,
        nodes=2,
        progress=False,
        workers=getattr(args, "workers", 1),
        agent_args=["--destination-l7", getattr(args, "destination_l7", "always")],
    )
    runner: Runner | None = None
    try:
        runner = Runner(sb, args)
        client, mesh_ip = _run_scenarios(sb, runner, args, scenarios, rates, result)
        if args.restart:
            for kind in ("graceful", "kill -9"):
                for node in ("n1", "n2"):
                    row = restart_under_load(sb, args, client, mesh_ip, node, kind)
                    result.rows.append(row)
                    result.add(f"restart {row['load']} failed", row["errors"], "requests")
                    if row["p99_ms"] is not None:
                        result.add(f"restart {row['load']} p99", row["p99_ms"], "ms")
        if args.propagation_samples > 0:
            say(f"config propagation: {args.propagation_samples} applies")
            samples = trio.run(measure_propagation, sb, args.propagation_samples)
            result.add("config propagation p50", percentile(samples, 50), "ms")
            result.add("config propagation p99", percentile(samples, 99), "ms")
    finally:
        if runner is not None and runner.haproxy is not None:
            runner.haproxy.stop()
        say("tearing the sandbox down")
        sb.down()
    if args.enroll_pods > 0:
        say(f"enrollment: the enroll bench with {args.enroll_pods} pods")
        er = enroll_bench.run(argparse.Namespace(pods=args.enroll_pods))
        for f in er.figures:
            if f.metric.startswith("ADD"):
                result.add(f"enrollment {f.metric.removeprefix('ADD ')}", f.value, f.unit)
    result.meta["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        say(f"wrote {out}")
    return result


def _run_scenarios(
    sb: Sandbox,
    runner: Runner,
    args: argparse.Namespace,
    scenarios: list[str],
    rates: list[float],
    result: Result,
) -> tuple[Pod, str]:
    """Runs `scenarios`; returns the meshed client and the address the mesh set-up targets."""
    for pod in sb.pods():
        if pod.namespace == NS:
            raise RuntimeError(f"sandbox already has bench pods ({pod.key})")
    srv_direct = sb.pod_add(
        "n2", NS, "server-direct", _server_cmd(sb, args, "direct"), labels=OPT_OUT
    )
    srv_mesh = sb.pod_add(
        "n2",
        NS,
        "server-mesh",
        _server_cmd(sb, args, "mesh"),
        labels={"app": SERVICE},
        service_account=SERVICE,
    )
    cli_direct = sb.pod_add("n1", NS, "client-direct", ["sleep", "infinity"], labels=OPT_OUT)
    cli_mesh = sb.pod_add("n1", NS, "client-mesh", ["sleep", "infinity"], service_account="client")
    # Thousands of short connections per run: let TIME_WAIT ports be reused (these are the
    # sandbox's own namespaces, never the machine's).
    for target in (srv_direct, srv_mesh, cli_direct, cli_mesh, "node/n1", "node/n2"):
        sb.exec(target, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], check=True)
    revision, vip = trio.run(apply_config, sb.store_url)
    trio.run(wait_revision, [n.admin_socket for n in sb.nodes()], revision)
    for pod in (srv_direct, srv_mesh):
        _wait_probe(sb, cli_direct, pod.ip, "server")
    mesh_ip = vip
    if not _probe(sb, cli_mesh, vip):
        mesh_ip = srv_mesh.ip
        _wait_probe(sb, cli_mesh, mesh_ip, "meshed server")
        result.notes.append(
            f"the agents do not route the Service VIP {vip} yet: the mesh set-up targets the "
            f"meshed server's pod IP {mesh_ip} (still through both agents)"
        )
    result.parameters["mesh_target"] = "vip" if mesh_ip == vip else "pod-ip"
    say(f"mesh target {mesh_ip} ({result.parameters['mesh_target']}); starting HAProxy")
    hops = [Hop(k, HAPROXY_PORTS[k], PORTS[k]) for k in ("echo", "http", "bulk")]
    hops += [Hop(k, HAPROXY_PORTS[k], PORTS[k], http2=True) for k in H2_SCENARIOS]
    runner.haproxy = HAProxyPipeline(sb, hops, srv_direct.ip)
    runner.haproxy.start()
    hp_ip = runner.haproxy.client_ip
    _wait_probe(sb, cli_direct, hp_ip, "haproxy", port=HAPROXY_PORTS["echo"])
    targets: dict[str, tuple[Pod, str, dict[str, int]]] = {
        "direct": (cli_direct, srv_direct.ip, PORTS),
        "mesh": (cli_mesh, mesh_ip, PORTS),
        "haproxy": (cli_direct, hp_ip, HAPROXY_PORTS),
    }
    timeout = args.duration + args.warmup + 60
    mode = {
        "l4": ("rr", "echo"),
        "connect": ("connect", "echo"),
        "http": ("http", "http"),
        "http-l4": ("http", "http-l4"),
    }
    if set(scenarios) & set(H2_SCENARIOS) and getattr(args, "server", "nginx") != "nginx":
        raise SystemExit("scripts/bench mesh: the h2 and grpc scenarios need --server nginx")
    grpc_request = grpc_server.request_file(sb.state_dir / "bench-grpc-request.bin")
    if "grpc" in scenarios:
        # h2load sees HTTP statuses only, and a gRPC error is HTTP 200: one real gRPC call per
        # set-up first proves the calls are answered by the server, not by a proxy's error.
        for setup in SETUPS:
            client, ip, ports = targets[setup]
            probe = [sys.executable, "-m", "nodeagent.bench.grpc_server", "--probe",
                     f"{ip}:{ports['grpc']}"]  # fmt: skip
            r = sb.exec(client, probe, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"gRPC probe ({setup}) failed: {r.stdout} {r.stderr}")
    for scenario in scenarios:
        if scenario in H2_SCENARIOS:
            h2_loads = [(f"{r:g}/s", r) for r in rates] + ([] if args.no_max else [("max", 0.0)])
            for label, rate in h2_loads:
                for setup in SETUPS:
                    client, ip, ports = targets[setup]
                    url = f"http://{ip}:{ports[scenario]}"
                    argv = h2load_argv(scenario, url, args, rate, grpc_request)
                    result.rows.append(
                        runner.measure(setup, scenario, label, client, argv, timeout)
                    )
            continue
        if scenario == "churn":
            rate, duration = args.churn_rate, args.churn_duration
            for setup in SETUPS:
                client, ip, ports = targets[setup]
                argv = loadgen_argv("connect", f"{ip}:{ports['echo']}", args, rate, duration)
                load = f"{rate:g}/s {duration:g}s"
                churn_timeout = duration + args.warmup + 60
                result.rows.append(
                    runner.measure(setup, "churn", load, client, argv, churn_timeout)
                )
            continue
        if scenario == "bulk":
            for setup in SETUPS:
                client, ip, ports = targets[setup]
                argv = [
                    sys.executable, "-m", "nodeagent.bench.loadgen", "bulk",
                    f"{ip}:{ports['bulk']}", "--size", str(args.bulk_mib * 1024 * 1024),
                    "--connections", str(args.bulk_transfers),
                ]  # fmt: skip
                result.rows.append(runner.measure(setup, "bulk", "-", client, argv, timeout))
            continue
        lg_mode, port_name = mode[scenario]
        loads: list[tuple[str, float]] = [(f"{r:g}/s", r) for r in rates]
        if not args.no_max:
            loads.append(("max", 0.0))
        # http-l4 differs from http only inside the mesh: direct and HAProxy would repeat http.
        setups = ("mesh",) if scenario == "http-l4" else SETUPS
        for label, rate in loads:
            for setup in setups:
                client, ip, ports = targets[setup]
                target = f"{ip}:{ports[port_name]}"
                if scenario.startswith("http") and rate == 0.0:
                    argv = [
                        "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration:g}s",
                        "--latency", "-H", f"Host: {HOST}", f"http://{target}/",
                    ]  # fmt: skip
                else:
                    argv = loadgen_argv(lg_mode, target, args, rate)
                result.rows.append(runner.measure(setup, scenario, label, client, argv, timeout))
    figures(result)
    return cli_mesh, mesh_ip


def restart_under_load(
    sb: Sandbox, args: argparse.Namespace, client: Pod, ip: str, node: str, kind: str
) -> dict[str, Any]:
    """HTTP through both agents at `--restart-rate` (half on keep-alive connections, half on a
    new connection per request; `hey`, 10 workers each) while `node`'s agent restarts (`kind`:
    "graceful" or "kill -9"); the row sums failed requests and takes the worse p99 over the
    whole run, the restart included. `hey`, not `loadgen`: loadgen stops at the first closed
    persistent connection, hey reconnects as a client would."""
    duration, lead = 8.0, 1.5  # the restart starts `lead` s into the run
    url = f"http://{ip}:{PORTS['http']}/"
    per_worker = f"{args.restart_rate / 20:g}"  # hey's -q is per worker: 2 x 10 workers
    base = ["hey", "-z", f"{duration:g}s", "-c", "10", "-q", per_worker, "-t", "10", "-host", HOST]
    gens = [
        sb.popen(client, [*base, *flags, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True)
        for flags in ([], ["-disable-keepalive"])
    ]  # fmt: skip
    outs: list[str] = []
    try:
        time.sleep(lead)
        t0 = time.perf_counter()
        if kind == "graceful":
            sb.restart_agent(node)
        else:
            sb.kill_agent(node)
            sb.start_agent(node)
        restart_s = time.perf_counter() - t0
        for gen in gens:
            out, err = gen.communicate(timeout=duration + 60)
            if gen.returncode != 0:
                raise RuntimeError(f"hey (restart {kind} {node}) exited {gen.returncode}: {err}")
            outs.append(out)
    finally:
        for gen in gens:
            if gen.poll() is None:
                gen.kill()
                gen.wait()
    parsed = [parse_hey(o) for o in outs]
    p99s = [h["p99_ms"] for h in parsed if h["p99_ms"] is not None]
    row: dict[str, Any] = {
        "scenario": "restart",
        "load": f"{args.restart_rate:g}/s {kind} {node}",
        "setup": "mesh",
        "requests": sum(h["requests"] for h in parsed),
        "errors": sum(h["errors"] for h in parsed),
        "rate": round(sum(h["rate"] for h in parsed), 1),
        "p99_ms": max(p99s) if p99s else None,
        "restart_s": round(restart_s, 2),
        "first_error": next((h["first_error"] for h in parsed if h["first_error"]), None),
    }
    say(
        f"restart  {row['load']:>22} {row['rate']:>7.0f} req/s  p99 {_ms(row['p99_ms'])}  "
        f"errors {row['errors']}  (restart {restart_s:.1f}s)"
        + (f"  first error: {row['first_error']}" if row["first_error"] else "")
    )
    return row


def parse_hey(text: str) -> dict[str, Any]:
    """hey's summary: requests, failed (non-200 responses and errors), rate, p99."""
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    bad = sorted(c for c in codes if c != 200)
    errors: list[tuple[str, str]] = []
    if "Error distribution:" in text:
        errors = re.findall(r"\[(\d+)\]\s+(.+)", text.split("Error distribution:")[-1])
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"99%+ in ([\d.]+) secs", text)
    return {
        "requests": sum(codes.values()),
        "errors": sum(n for c, n in codes.items() if c != 200) + sum(int(n) for n, _ in errors),
        "rate": float(rate.group(1)) if rate else 0.0,
        "p99_ms": float(p99.group(1)) * 1000 if p99 else None,
        "first_error": errors[0][1].strip() if errors else (f"HTTP {bad[0]}" if bad else None),
    }


def _server_cmd(sb: Sandbox, args: argparse.Namespace, which: str) -> list[str]:
    """A server pod's command; nginx's files go under the sandbox's state dir (removed by
    `down`)."""
    if getattr(args, "server", "nginx") == "builtin":
        return [sys.executable, "-m", "nodeagent.bench.server", "--http-l4", str(PORTS["http-l4"])]
    return nginx.server_argv(sb.state_dir / f"nginx-{which}", PORTS)


def _probe(sb: Sandbox, client: Pod, ip: str, port: int = PORTS["echo"]) -> bool:
    argv = [sys.executable, "-m", "nodeagent.bench.loadgen", "probe", f"{ip}:{port}"]
    return sb.exec(client, argv, timeout=20).returncode == 0


def _wait_probe(
    sb: Sandbox, client: Pod, ip: str, what: str, port: int = PORTS["echo"], timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while not _probe(sb, client, ip, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} at {ip}:{port} does not answer from {client.key}")
        time.sleep(0.2)


# ----- figures out of rows ------------------------------------------------------------------------


def figures(result: Result) -> None:
    """The headline figures: added latency, ratios, max rates, CPU, RSS, throughput."""
    rows = result.rows
    index = {(r["scenario"], r["load"], r["setup"]): r for r in rows}
    add: Callable[[str, float, str], None] = result.add

    def num(row: dict[str, Any] | None, key: str) -> float | None:
        v = row.get(key) if row else None
        return float(v) if isinstance(v, int | float) else None

    _destination_l7_figures(add, index)
    for scenario, load, _ in sorted({k for k in index if k[2] == "direct"}):
        d = index.get((scenario, load, "direct"))
        if scenario == "bulk":
            base = num(d, "mb_per_s")
            for setup in SETUPS:
                v = num(index.get((scenario, load, setup)), "mb_per_s")
                if v is not None:
                    add(f"bulk {setup}", v, "MB/s")
                    if setup != "direct" and base:
                        add(f"bulk {setup}/direct", v / base, "ratio")
            continue
        if load == "max":
            base = num(d, "rate")
            for setup in SETUPS:
                v = num(index.get((scenario, load, setup)), "rate")
                if v is None:
                    continue
                unit = "conn/s" if scenario == "connect" else "req/s"
                add(f"{scenario} max rate {setup}", v, unit)
                if scenario == "connect" and setup != "direct":
                    # Every new connection between the two proxies is a TLS handshake (HAProxy;
                    # the mesh once its tunnel is mTLS), resumed where the proxy caches sessions.
                    add(f"handshakes/s {setup}", v, "1/s")
                if setup != "direct" and base:
                    add(f"{scenario} max rate {setup}/direct", v / base, "ratio")
            continue
        for setup in ("mesh", "haproxy"):
            s = index.get((scenario, load, setup))
            for q in ("p50", "p90", "p99", "mean"):
                sv, dv = num(s, f"{q}_ms"), num(d, f"{q}_ms")
                if sv is None or dv is None:
                    continue
                add(f"{scenario} {load} {q} added {setup}", sv - dv, "ms")
                if q == "p90" and dv > 0:
                    add(f"{scenario} {load} p90 {setup}/direct", sv / dv, "ratio")
        if scenario == "churn":
            # Sustained churn fails by queueing past the generator's drain: count the failures.
            for setup in SETUPS:
                failed = num(index.get((scenario, load, setup)), "errors")
                if failed is not None:
                    add(f"churn {load} failed {setup}", int(failed), "requests")
        m = index.get((scenario, load, "mesh"))
        cpu, wall, covered = num(m, "agent_cpu_s"), num(m, "wall_s"), num(m, "requests_covered")
        idle_cpu, idle_wall = num(d, "agent_cpu_s"), num(d, "wall_s")
        if cpu is not None and wall and covered:
            # The direct run crosses no agent: its agent CPU is the agents' idle cost (store
            # watch, lease), subtracted so the figure is the cost of the traffic alone.
            idle = (idle_cpu or 0.0) / idle_wall * wall if idle_wall else 0.0
            per_1k = max(0.0, cpu - idle) / covered * 1000
            rate = num(m, "rate") or 0.0
            add(f"{scenario} {load} agent CPU per 1000 req", per_1k, "s")
            add(f"{scenario} {load} agent vCPU", per_1k * rate / 1000.0, "vCPU")
            add(f"{scenario} {load} agent idle vCPU", idle / wall, "vCPU")
        _cpu_figures(add, str(scenario), str(load), m, index.get((scenario, load, "haproxy")))
        rss = m.get("agent_rss_mib") if m else None
        if isinstance(rss, dict) and rss:
            add(f"{scenario} {load} agent RSS max", max(float(v) for v in rss.values()), "MiB")


def _destination_l7_figures(
    add: Callable[[str, float, str], None], index: dict[tuple[Any, Any, Any], dict[str, Any]]
) -> None:
    """L7 on (`http`: both agents parse) vs off (`http-l4`: both relay) at each load, mesh
    set-up: the added latency, the rate at max, and CPU per 1,000 requests of each agent; the
    server's agent (n2) difference is what the destination's parsing, authorization and
    telemetry cost."""
    for scenario, load, setup in sorted(k for k in index if k[0] == "http-l4"):
        on, off = index.get(("http", load, "mesh")), index[(scenario, load, setup)]
        if on is None:
            continue
        for q in ("p50", "p90", "p99"):
            a, b = on.get(f"{q}_ms"), off.get(f"{q}_ms")
            if isinstance(a, int | float) and isinstance(b, int | float):
                add(f"http L7 on-off {load} {q}", a - b, "ms")
        if load == "max":
            add("http L7 off max rate", float(off.get("rate") or 0.0), "req/s")
        for node in ("n1", "n2"):
            cpu_on = (on.get("agent_cpu_s_by_node") or {}).get(node)
            cpu_off = (off.get("agent_cpu_s_by_node") or {}).get(node)
            n_on, n_off = on.get("requests_covered"), off.get("requests_covered")
            if not (isinstance(cpu_on, int | float) and isinstance(cpu_off, int | float)):
                continue
            if not (n_on and n_off):
                continue
            side = "source" if node == "n1" else "destination"
            per_on, per_off = cpu_on / n_on * 1000, cpu_off / n_off * 1000
            add(f"http {load} {side} agent CPU per 1000 req L7 on", per_on, "s")
            add(f"http {load} {side} agent CPU per 1000 req L7 off", per_off, "s")
            add(f"http {load} {side} agent CPU per 1000 req L7 added", per_on - per_off, "s")


def _cpu_figures(
    add: Callable[[str, float, str], None],
    scenario: str,
    load: str,
    mesh_row: dict[str, Any] | None,
    haproxy_row: dict[str, Any] | None,
) -> None:
    """CPU per 1,000 requests of the mesh (per agent too) and of HAProxy (both processes) from
    the same run, their ratio, and the per-agent vCPU at 1,000 req/s beside Istio's published
    figures (ztunnel for L4, the waypoint for HTTP). Raw process CPU on both sides (no idle
    subtracted), so the ratio compares like with like."""
    mesh_ms = (mesh_row or {}).get("agent_cpu_ms_per_req")
    hap_ms = (haproxy_row or {}).get("haproxy_cpu_ms_per_req")
    if isinstance(mesh_ms, int | float):
        add(f"{scenario} {load} mesh CPU per 1000 req", mesh_ms, "s")
        per_agent = mesh_ms / 2  # two agents: the client's node and the server's
        add(f"{scenario} {load} CPU per 1000 req per agent", per_agent, "vCPU per 1000 req/s")
        reference = {"l4": "ztunnel", "http": "waypoint"}.get(scenario)
        if reference is not None:
            ref = REFERENCE_VCPU_PER_1K[reference]
            add(
                f"{scenario} {load} per agent / {reference} published {ref:g}",
                per_agent / ref,
                "ratio",
            )
    if isinstance(hap_ms, int | float):
        add(f"{scenario} {load} haproxy CPU per 1000 req", hap_ms, "s")
        if isinstance(mesh_ms, int | float) and hap_ms > 0:
            add(f"{scenario} {load} CPU per 1000 req mesh/haproxy", mesh_ms / hap_ms, "ratio")
