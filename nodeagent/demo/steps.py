"""The demo's story, one function per step: what the source article shows, run for real on the
sandbox and checked. A step raises `StepFailed` with the reason when the mesh does not behave;
`Demo` carries what the steps share (the sandbox, the pods, the work directory)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import yaml

from nodeagent.admin.client import AdminClientError, admin_call_sync, admin_json_sync
from nodeagent.contract import METRICS_PATH, METRICS_PORT
from nodeagent.demo import output as out
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.store import keys, open_store

# The article's examples, beside the checkout: <checkout>/../shared/corpus/seed (runner.py says
# so when it is missing).
CHECKOUT = Path(__file__).resolve().parents[2]
SEED = CHECKOUT.parent / "shared" / "corpus" / "seed"
# The pods' app and the outside host's load generator: real modules, run by path with -I (no
# import of the mesh, no script directory on sys.path).
BACKEND = Path(__file__).with_name("backend.py")
LOAD = Path(__file__).with_name("load.py")
STEADY = Path(__file__).with_name("steady.py")  # constant load, for the rollout step
MESHCTL = str(Path(sys.prefix) / "bin" / "meshctl")
MY_APP_VIP = "10.96.0.10"
RATINGS_VIP = "10.96.0.11"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
CANARY_REQUESTS = 1000
SHIFT_REQUESTS = 400


class StepFailed(Exception):
    pass


@dataclass
class Demo:
    sb: Sandbox
    work: Path
    pods: dict[str, Pod] = field(default_factory=dict)
    # Requests each version answered during the demo (the metrics step compares against it).
    served: dict[str, int] = field(default_factory=dict)

    # ----- tools ------------------------------------------------------------------------------

    def meshctl(self, *args: str, show: bool = True) -> str:
        argv = [MESHCTL, "--store", self.sb.store_url, *args]
        if show:
            out.command(["meshctl", *args])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        text = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            last = text.splitlines()[-1] if text else "no output"
            if show:
                out.evidence(*text.splitlines()[-6:])
            raise StepFailed(f"meshctl {args[0]} exited {done.returncode}: {last}")
        if show and text:
            out.evidence(*text.splitlines()[:8])
        return text

    @property
    def gateway_node(self) -> str:
        node = self.sb.state().gateway
        if node is None:
            raise StepFailed("the demo's sandbox has no gateway")
        return node

    def wait_config(self, node: str, timeout: float = 15) -> None:
        """Until `node`'s agent serves a snapshot holding everything applied so far (its
        revision reaches the store's): a request sent before would show the old routes."""
        revision = trio.run(_store_revision, self.sb.store_url)
        deadline = time.monotonic() + timeout
        while True:
            dump = admin_json_sync(self.sb.node(node).admin_socket, "/config_dump", timeout=5)
            if (dump.get("snapshot") or {}).get("revision", 0) >= revision:
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"{node}'s agent did not get the configuration in {timeout:g} s")
            time.sleep(0.05)

    def apply(self, name: str, docs: list[dict[str, Any]], show: bool = True) -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        self.meshctl("apply", "-f", str(path), show=show)
        return path

    def curl(
        self, target: str | Pod, url: str, *headers: str, timeout: float = 5
    ) -> tuple[int, str, float]:
        """(HTTP status, body, seconds) of one curl; status 0 when no answer came."""
        argv = ["curl", "-s", "--max-time", str(timeout), "-w", "\n%{http_code}", url]
        for h in headers:
            argv += ["-H", h]
        started = time.monotonic()
        r = self.sb.exec(target, argv, timeout=timeout + 10)
        elapsed = time.monotonic() - started
        body, _, code = str(r.stdout).rpartition("\n")
        return int(code) if code.isdigit() else 0, body.strip(), elapsed

    def admin(self, node: str, path: str) -> str:
        try:
            body = admin_call_sync(self.sb.node(node).admin_socket, "GET", path, timeout=5)
        except AdminClientError as exc:
            raise StepFailed(f"admin socket of {node} ({path}): {exc}") from None
        return body.decode()

    def load(self, path: str, n: int, concurrency: int = 16) -> dict[str, Any]:
        """n requests from the outside host through the gateway; versions counted by answer."""
        host = self.sb.gateway_url().removeprefix("http://").split(":")[0]
        argv = [sys.executable, "-I", str(LOAD), host, "80", path, str(n), str(concurrency)]
        out.command(["(outside)", "load", f"{self.sb.gateway_url()}{path}", f"-n {n}"])
        proc = self.sb.popen("outside", argv, stdout=subprocess.PIPE, text=True)
        result: dict[str, Any] | None = None
        started = time.monotonic()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("progress "):
                    out.progress(f"{line.split()[1]}/{n} requests")
                elif line.startswith("result "):
                    result = json.loads(line.removeprefix("result "))
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if result is None:
            raise StepFailed(f"the load generator exited {proc.returncode} without a result")
        result["seconds"] = time.monotonic() - started
        for v, k in result["versions"].items():
            if v != "-":
                self.served[v] = self.served.get(v, 0) + int(k)
        return result

    def eventually(self, check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise StepFailed(f"not within {timeout:g}s: {what}")
            time.sleep(0.2)


# ----- documents ----------------------------------------------------------------------------


def _service(name: str, vip: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": vip,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "targetPort": 8080}],
        },
    }


def _seed(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((SEED / name).read_text()) if d]


def _canary(v1: int, v2: int) -> list[dict[str, Any]]:
    """The seed canary's VirtualService with other weights."""
    vs = copy.deepcopy(next(d for d in _seed("01-canary.yaml") if d["kind"] == "VirtualService"))
    route = vs["spec"]["http"][0]["route"]
    route[0]["weight"], route[1]["weight"] = v1, v2
    if v2 == 0:
        del route[1]
        del route[0]["weight"]
    return [vs]


def _peer_auth_strict() -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "default"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }


def _deny_client() -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "my-app"}},
            "action": "DENY",
            "rules": [
                {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client"]}}]}
            ],
        },
    }


# ----- the steps ----------------------------------------------------------------------------


def deploy(d: Demo) -> None:
    app = [sys.executable, "-I", str(BACKEND)]
    sb = d.sb
    out.progress("starting pods through the CNI chain")
    d.pods["v1"] = sb.pod_add(
        "n1", "default", "my-app-v1", [*app, "v1.0.0"],
        service_account="my-app", labels={"app": "my-app", "version": "v1.0.0"},
    )  # fmt: skip
    d.pods["v2"] = sb.pod_add(
        "n2", "default", "my-app-v2", [*app, "v2.0.0"],
        service_account="my-app", labels={"app": "my-app", "version": "v2.0.0"},
    )  # fmt: skip
    d.pods["ratings"] = sb.pod_add(
        "n2", "default", "ratings-v2", [*app, "ratings-v2"],
        service_account="ratings", labels={"app": "ratings", "version": "v2"},
    )  # fmt: skip
    d.pods["client"] = sb.pod_add(
        "n1", "default", "client", ["sleep", "3600"], service_account="client"
    )
    d.pods["plain"] = sb.pod_add(
        "n1", "default", "plaintext", ["sleep", "3600"],
        labels={"istio.io/dataplane-mode": "none"},
    )  # fmt: skip
    rows = [
        (p.name, p.node, p.ip, "mesh" if k != "plain" else "outside the mesh (dataplane-mode=none)")
        for k, p in d.pods.items()
    ]
    out.evidence(*out.table(["pod", "node", "ip", "traffic"], rows))
    ratings_dr = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "ratings", "namespace": "default"},
        "spec": {"host": "ratings", "subsets": [{"name": "v2", "labels": {"version": "v2"}}]},
    }
    d.apply(
        "services",
        [_service("my-app", MY_APP_VIP, 80), _service("ratings", RATINGS_VIP, 80), ratings_dr],
    )
    # Every pod has its certificate before the story starts (a cold start is not the point).
    d.eventually(
        lambda: d.curl(d.pods["client"], f"http://{MY_APP_VIP}/")[0] == 200,
        "client → my-app through the mesh",
        timeout=30,
    )


def canary(d: Demo) -> None:
    d.meshctl("apply", "-f", str(SEED / "01-canary.yaml"))
    url = f"{d.sb.gateway_url()}/my-app/"
    d.eventually(lambda: d.curl("outside", url)[0] == 200, "the gateway serves /my-app")
    _split(d, CANARY_REQUESTS, {"v1.0.0": 0.9, "v2.0.0": 0.1})


def _split(d: Demo, n: int, expect: dict[str, float]) -> None:
    res = d.load("/my-app/", n)
    versions: dict[str, int] = {k: int(v) for k, v in res["versions"].items()}
    out.evidence(
        f"{n} requests in {res['seconds']:.1f}s, answers by version:",
        *out.split_lines(versions, list(expect)),
    )
    codes = {int(k): int(v) for k, v in res["codes"].items()}
    if codes != {200: n}:
        raise StepFailed(f"not every request got 200: {codes} {res['errors']}")
    for version, p in expect.items():
        got = versions.get(version, 0)
        if p in (0.0, 1.0):
            if got != round(p * n):
                raise StepFailed(f"{version} answered {got} of {n}, expected {round(p * n)}")
            continue
        low, high = out.binomial_interval(n, p)
        if not low <= got <= high:
            raise StepFailed(f"{version} answered {got} of {n}, expected {low:.0f}..{high:.0f}")
    out.evidence("within the 99.9% binomial interval of the configured weights: yes")


def shift(d: Demo) -> None:
    d.apply("canary-50-50", _canary(50, 50))
    url = f"{d.sb.gateway_url()}/my-app/"
    # The new weights apply once both agents saw the change; 20 answers of v2 out of 40 is
    # impossible under 90/10 in practice, so wait for a clear sign before measuring.
    d.eventually(
        lambda: sum(out.version_of(d.curl("outside", url)[1]) == "v2.0.0" for _ in range(6)) >= 2,
        "50/50 in effect",
    )
    _split(d, SHIFT_REQUESTS, {"v1.0.0": 0.5, "v2.0.0": 0.5})
    print()
    d.apply("canary-100-0", _canary(100, 0))
    d.eventually(
        lambda: all(out.version_of(d.curl("outside", url)[1]) == "v1.0.0" for _ in range(6)),
        "100/0 in effect",
    )
    _split(d, SHIFT_REQUESTS, {"v1.0.0": 1.0, "v2.0.0": 0.0})


def ab_test(d: Demo) -> None:
    d.meshctl("apply", "-f", str(SEED / "03-ab-user-agent.yaml"))
    url = f"{d.sb.gateway_url()}/my-app"
    chrome, firefox, other = (f"User-Agent: {ua}" for ua in (CHROME, FIREFOX, "curl/8"))
    # The canary before left every answer on v1, so no answer tells the new routes are in
    # effect: wait until the gateway's agent holds them.
    d.wait_config(d.gateway_node)
    rows, problems = [], []
    for label, header, want in (
        ("Chrome", chrome, (200, "v1.0.0")),
        ("Firefox", firefox, (200, "v2.0.0")),
        ("curl (neither)", other, (404, None)),
    ):
        code, body, _ = d.curl("outside", url, header)
        got = (code, out.version_of(body))
        rows.append((label, code, got[1] or "-", "ok" if got == want else f"expected {want}"))
        if got != want:
            problems.append(f"{label}: {got}, expected {want}")
    out.evidence(*out.table(["User-Agent", "status", "version", "check"], rows))
    print()
    out.explain("Appending a default route (no match, subset v1) as the last rule:")
    ab = _seed("03-ab-user-agent.yaml")[0]
    ab["spec"]["http"].append(
        {"route": [{"destination": {"host": "my-app", "subset": "v1", "port": {"number": 80}}}]}
    )
    d.apply("ab-default", [ab])
    d.eventually(lambda: d.curl("outside", url, other)[0] == 200, "default route in effect")
    code, body, _ = d.curl("outside", url, other)
    out.evidence(
        *out.table(["User-Agent", "status", "version"], [("curl", code, out.version_of(body))])
    )
    if (code, out.version_of(body)) != (200, "v1.0.0"):
        problems.append(f"default route: {code} {body!r}")
    if problems:
        raise StepFailed("; ".join(problems))


def _rollout_docs(stable: str, canary: str) -> list[dict[str, Any]]:
    """The seed canary's VirtualService at 100% `stable`, the DestinationRule with v3, and a
    Rollout of `canary` in 1 s intervals (seconds, for the demo; minutes in production)."""
    seed = {d["kind"]: d for d in _seed("01-canary.yaml")}
    vs = copy.deepcopy(seed["VirtualService"])
    route = vs["spec"]["http"][0]["route"]
    vs["spec"]["http"][0]["route"] = [
        {"destination": {**route[0]["destination"], "subset": stable}}
    ]
    dr = copy.deepcopy(seed["DestinationRule"])
    dr["spec"]["subsets"].append({"name": "v3", "labels": {"version": "v3.0.0"}})
    rollout = {
        "apiVersion": "mesh.nodeagent.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "my-app", "namespace": "default"},
        "spec": {
            "host": "my-app",
            "virtualService": {"name": "my-app"},
            "destinationRule": {"name": "my-app"},
            "stable": stable,
            "canary": canary,
            "analysis": {
                "interval": "1s",
                "threshold": 2,
                "stepWeight": 25,
                "maxWeight": 75,
                "metrics": [
                    {"name": "request-success-rate", "thresholdRange": {"min": 99}},
                    {"name": "request-duration", "thresholdRange": {"max": 500}},
                ],
            },
        },
    }
    return [vs, dr, rollout]


def _follow_rollout(d: Demo, timeout: float = 20.0) -> dict[str, Any]:
    """Print each step of the rollout as the controller records it; the final status."""
    deadline = time.monotonic() + timeout
    shown, began = 0, None
    while True:
        text = d.meshctl("rollout", "get", "my-app", "-o", "json", show=False)
        status: dict[str, Any] = json.loads(text) if text.startswith("{") else {}
        history = status.get("history") or []
        for step in history[shown:]:
            began = began if began is not None else step["time"]
            a = step.get("analysis") or {}
            rate, p99 = a.get("request-success-rate"), a.get("request-duration")
            checked = f"  checked: success {rate:.2f}%, p99 {p99:.0f}ms" if rate is not None else ""
            out.evidence(
                f"+{step['time'] - began:4.1f}s  canary weight {step['weight']:>3}%{checked}"
            )
        shown = len(history)
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        if time.monotonic() > deadline:
            raise StepFailed(f"the rollout did not end within {timeout:g}s: {status.get('phase')}")
        time.sleep(0.3)


def _gateway_load(d: Demo) -> subprocess.Popen[str]:
    host = d.sb.gateway_url().removeprefix("http://").split(":")[0]
    argv = [sys.executable, "-I", str(STEADY), host, "80", "/my-app/", "60", "60"]
    out.command(["(outside)", "steady load", f"{d.sb.gateway_url()}/my-app/", "60/s"])
    proc = d.sb.popen("outside", argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # "started …"
    return proc


def _stop_load(proc: subprocess.Popen[str]) -> list[list[Any]]:
    proc.terminate()
    try:
        stdout, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    lines = [x for x in stdout.splitlines() if x.startswith("result ")]
    if not lines:
        raise StepFailed("the load generator gave no result")
    requests: list[list[Any]] = json.loads(lines[0].removeprefix("result "))["requests"]
    return requests


def rollout(d: Demo) -> None:
    d.sb.pod_add(
        "n2", "default", "my-app-v3", [sys.executable, "-I", str(BACKEND), "v3.0.0",
                                       "--fail-every", "10"],
        service_account="my-app", labels={"app": "my-app", "version": "v3.0.0"},
    )  # fmt: skip
    load = _gateway_load(d)
    try:
        d.apply("rollout-v2", _rollout_docs("v1", "v2"))
        good = _follow_rollout(d)
        out.evidence(f"{good['phase']}: {good['events'][-1]['message']}")
        if good["phase"] != "Succeeded":
            raise StepFailed(f"the healthy canary was not promoted: {good['events'][-1]}")
        print()
        out.explain("Now v2 is stable and v3 (every 10th answer is a 500) is the canary:")
        d.apply("rollout-v3", _rollout_docs("v2", "v3"))
        failed = _follow_rollout(d)
        out.evidence(f"{failed['phase']}: {failed['events'][-1]['message']}")
        if failed["phase"] != "Failed" or failed["weight"] != 0:
            raise StepFailed(f"the bad canary was not rolled back: {failed['events'][-1]}")
        ended = failed["history"][-1]["time"]
        time.sleep(0.7)  # traffic after the rollback, to show where it goes
    finally:
        requests = _stop_load(load)
        d.meshctl("delete", "rollout", "my-app", show=False)
        d.sb.pod_del("my-app-v3", "default")
    late = {r[2] for r in requests if r[0] > ended + 0.5}
    codes = {r[1] for r in requests if r[0] < ended and r[2] != "v3.0.0"}
    out.evidence(
        f"{len(requests)} requests through the gateway; after the rollback every answer "
        f"came from {', '.join(sorted(late)) or 'nobody'}"
    )
    if late != {"v2.0.0"} or codes != {200}:
        raise StepFailed(f"after the rollback: versions {late}, other codes {codes}")


def fault(d: Demo) -> None:
    path = SEED / "02-fault-delay.yaml"
    d.meshctl("apply", "-f", str(path))
    try:
        d.wait_config(d.pods["client"].node)
        url = f"http://{MY_APP_VIP}/rate"
        out.command(["(client)", "curl", f"{url}  # my-app's VIP"])
        code, body, elapsed = _timed(d, d.pods["client"], url)
        out.evidence(f"HTTP {code} after {elapsed:.2f}s: {body}")
        if code != 200 or out.version_of(body) != "ratings-v2":
            raise StepFailed(f"expected 200 from ratings-v2, got {code} {body!r}")
        if not 7.0 <= elapsed < 8.5:
            raise StepFailed(f"the request took {elapsed:.2f}s, expected 7.0..8.5")
    finally:
        d.meshctl("delete", "-f", str(path), show=False)


async def _store_revision(url: str) -> int:
    store = await open_store(url)
    try:
        _, revision = await store.range(keys.ROOT)
    finally:
        await store.aclose()
    return revision


def _timed(d: Demo, pod: Pod, url: str, timeout: float = 15) -> tuple[int, str, float]:
    """One curl, with a progress line every 2 s while it waits."""
    argv = ["curl", "-s", "--max-time", str(timeout), "-w", "\n%{http_code}", url]
    started = time.monotonic()
    proc = d.sb.popen(pod, argv, stdout=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                stdout, _ = proc.communicate(timeout=2)
                break
            except subprocess.TimeoutExpired:
                out.progress(f"waiting… {time.monotonic() - started:.0f}s")
                if time.monotonic() - started > timeout + 5:
                    raise StepFailed(f"curl {url} did not end within {timeout + 5:g}s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    elapsed = time.monotonic() - started
    body, _, code = str(stdout).rpartition("\n")
    return int(code) if code.isdigit() else 0, body.strip(), elapsed


def mtls(d: Demo) -> None:
    client, plain, v2 = d.pods["client"], d.pods["plain"], d.pods["v2"]
    vip = f"http://{MY_APP_VIP}/"
    d.eventually(lambda: d.curl(client, vip, timeout=3)[0] == 200, "client → my-app, no delay")
    code, body, _ = d.curl(client, vip)
    out.evidence(f"client → my-app: HTTP {code} {body}")
    rows = []
    for node in ("n1", "n2"):
        for c in json.loads(d.admin(node, "/certs")):
            rows.append((node, c.get("identity"), c.get("state"), str(c.get("serial"))[:12],
                         c.get("not_after")))  # fmt: skip
    out.explain("Workload certificates on both agents (admin socket /certs, never keys):")
    out.evidence(*out.table(["agent", "identity", "state", "serial", "not after"], rows))
    scrapes = {node: d.admin(node, "/stats/prometheus") for node in ("n1", "n2")}
    peers = out.mtls_peers(scrapes)
    out.explain(
        "Connections the agents counted, by verified peer identities (admin socket "
        "/stats/prometheus, istio_tcp_connections_opened_total):"
    )
    out.evidence(
        *out.table(
            ["agent", "reporter", "source_principal", "destination_principal", "security", "conns"],
            peers,
        )
    )
    if not any("sa/client" in r[2] and "sa/my-app" in r[3] and r[4] == "mutual_tls" for r in peers):
        raise StepFailed("no mutual_tls connection from the client's identity to my-app's counted")
    direct = f"http://{v2.ip}:8080/"
    out.explain(f"A plaintext pod ({plain.ip}, not in the mesh) calls my-app-v2 directly:")
    code, body, _ = d.curl(plain, direct, timeout=3)
    out.evidence(f"PERMISSIVE (default): HTTP {code} {body}")
    if code != 200:
        raise StepFailed(f"PERMISSIVE should accept plaintext, got {code}")
    strict = d.apply("strict", [_peer_auth_strict()])
    try:
        d.eventually(lambda: d.curl(plain, direct, timeout=2)[0] == 0, "STRICT refuses plaintext")
        code, _, _ = d.curl(plain, direct, timeout=2)
        out.evidence(f"STRICT: plaintext {'refused (connection closed)' if code == 0 else code}")
        code, body, _ = d.curl(client, f"http://{MY_APP_VIP}/")
        out.evidence(f"STRICT: meshed client over mTLS: HTTP {code} {body}")
        if code != 200:
            raise StepFailed(f"STRICT refused the meshed client too ({code})")
    finally:
        d.meshctl("delete", "-f", str(strict), show=False)


def deny(d: Demo) -> None:
    client, v2 = d.pods["client"], d.pods["v2"]
    direct, vip = f"http://{v2.ip}:8080/", f"http://{MY_APP_VIP}/"
    d.eventually(lambda: d.curl(client, direct, timeout=3)[0] == 200, "client → my-app-v2 allowed")
    out.evidence(f"before: client → my-app-v2 ({v2.ip}:8080): HTTP 200")
    path = d.apply("deny", [_deny_client()])
    try:
        d.eventually(
            lambda: d.curl(client, direct, timeout=3)[0] != 200, "the DENY refuses the client"
        )
        code, _, _ = d.curl(client, direct, timeout=3)
        out.evidence(
            f"under DENY: client → my-app-v2: {'refused' if code == 0 else f'HTTP {code}'}"
        )
        for line in _denials(d.sb.node("n2").agent_log, "deny-client")[-1:]:
            out.evidence(f"n2's agent: {line}")
        gw, gbody, _ = d.curl("outside", f"{d.sb.gateway_url()}/my-app/")
        out.evidence(f"meanwhile the gateway (another identity) → my-app: HTTP {gw} {gbody}")
        if gw != 200:
            raise StepFailed(f"the DENY for the client also refused the gateway ({gw})")
        # The client's HTTP proxy holds keep-alive tunnels opened before the policy: on the
        # HTTP port the destination agent authorizes every request on them.
        d.eventually(lambda: d.curl(client, vip, timeout=3)[0] == 403, "the DENY reaches the VIP")
        code, body, _ = d.curl(client, vip, timeout=3)
        out.evidence(f"under DENY: client → my-app (VIP, HTTP): HTTP {code} {body}".rstrip())
    finally:
        d.meshctl("delete", "-f", str(path), show=False)
    d.eventually(lambda: d.curl(client, direct, timeout=3)[0] == 200, "allowed after the DENY")
    out.evidence("policy deleted: client → my-app-v2: HTTP 200 again")


def _denials(log: Path, policy: str) -> list[str]:
    """The agent's denial lines naming `policy`, shortened to the fields that tell the story."""
    found = []
    for line in log.read_text(errors="replace").splitlines()[-2000:]:
        if policy not in line or "{" not in line:
            continue
        try:
            rec = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if isinstance(rec, dict):
            keys = ("event", "result", "flag", "policy", "src_identity", "dst_identity",
                    "response_code", "response_code_details", "source_principal")  # fmt: skip
            found.append(" ".join(f"{k}={rec[k]}" for k in keys if rec.get(k)))
    return found


def metrics(d: Demo) -> None:
    scrapes = {}
    for node in ("n1", "n2"):
        r = d.sb.exec(
            f"node/{node}",
            ["curl", "-sf", "--max-time", "5", f"http://127.0.0.1:{METRICS_PORT}{METRICS_PATH}"],
            timeout=10,
        )
        if r.returncode != 0:
            raise StepFailed(
                f"{node}: GET :{METRICS_PORT}{METRICS_PATH} failed (curl {r.returncode})"
            )
        scrapes[node] = str(r.stdout)
    sums, problems = out.requests_by_version(scrapes)
    if problems:
        raise StepFailed("; ".join(problems))
    if not sums:
        names = sorted({n for text in scrapes.values() for n in out.metric_names(text)})
        out.evidence("no istio_requests_total samples in either scrape; what is there:")
        out.evidence(*(f"  {n}" for n in names[:30]))
        raise StepFailed("the agents export no istio_requests_total")
    rows = [(v, r, c, int(n)) for (v, r, c), n in sorted(sums.items())]
    out.evidence(*out.table(["destination_version", "reporter", "response_code", "requests"], rows))
    by_version: dict[str, float] = {}
    for (v, _r, _c), n in sums.items():
        by_version[v] = by_version.get(v, 0.0) + n
    out.evidence("", "answers counted by the demo itself: " + ", ".join(
        f"{v}={n}" for v, n in sorted(d.served.items())
    ))  # fmt: skip
    short = [v for v in ("v1.0.0", "v2.0.0") if by_version.get(v, 0.0) < d.served.get(v, 0)]
    if short:
        raise StepFailed(f"the metrics count fewer requests than were served for {short}")


STEPS: list[tuple[str, str, Callable[[Demo], None]]] = [
    (
        "Deploy my-app v1 and v2, ratings, a client and a plaintext pod",
        "Pods are network namespaces made by the real CNI plugins; the agents capture their "
        "traffic. my-app v1 runs on n1, v2 on n2; the client is meshed, the plaintext pod is not.",
        deploy,
    ),
    (
        "Canary release: 90% to v1, 10% to v2 (the article's first example)",
        f"The article's Gateway, VirtualService and DestinationRule as they are. "
        f"{CANARY_REQUESTS} requests from the outside host through the ingress gateway on n1; "
        f"each answer names the version that served it.",
        canary,
    ),
    (
        "Moving the canary: 50/50, then 100/0",
        "Only the weights change; the mesh applies them without restarting anything.",
        shift,
    ),
    (
        "A/B test by User-Agent (the article's third example)",
        "Rules are tried in order: Chrome gets v1, any other Mozilla gets v2; a request matching "
        "neither gets no route (404) until a default route is added.",
        ab_test,
    ),
    (
        "Releases that drive themselves: a canary promoted, a bad one rolled back",
        "The article's 'roll back if the metrics go wrong', automated: a Rollout names the "
        "stable and canary subsets; the controller moves the weights every interval while "
        "the agents' metrics say the canary is healthy (success rate, p99), and rolls back "
        "when they do not. Constant load through the gateway meanwhile.",
        rollout,
    ),
    (
        "Fault injection: a 7 s delay (the article's second example)",
        "Every request to my-app is held for 7 s, then routed to subset v2 of ratings. One "
        "request from the client pod, timed.",
        fault,
    ),
    (
        "mTLS: identities, and a plaintext client under STRICT",
        "Pod-to-pod traffic crosses nodes in a mutual-TLS tunnel between the two agents, each "
        "side proving its SPIFFE identity. Under a STRICT PeerAuthentication, plaintext is "
        "refused.",
        mtls,
    ),
    (
        "Authorization: DENY the client's identity",
        "An AuthorizationPolicy on my-app denies the principal cluster.local/ns/default/sa/client;"
        " other callers are not affected. Then the policy is removed.",
        deny,
    ),
    (
        "Metrics: istio_requests_total by destination version",
        "Both agents' Prometheus endpoints (:15020/stats/prometheus), summed by "
        "destination_version, as Istio's dashboards query them.",
        metrics,
    ),
]
