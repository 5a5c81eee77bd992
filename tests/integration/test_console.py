"""The mesh console in a real headless browser (Debian chromium + chromium-driver, Selenium).

A 2-node sandbox (`scripts/sandbox up` starts the console in its own namespace) runs `my-app`
v1 and v2 (the demo's backend) and a v3 that answers 500 (the same backend, every GET a 500),
a client pod calling my-app in a bounded loop, and the outside host calling through n1's ingress
gateway. The browser runs in the outside host's namespace (its driver is started from a thread
that entered it: nothing listens in the machine's own namespace) and opens
`Sandbox.console_url()`. It checks: the graph's nodes and edges with non-zero rates; v3 turns
to the failing colour within the refresh interval once routed to; a VirtualService with a
missing subset is listed under config health by name; a rollout record shows in its panel; no
console errors. The screenshots in README.md (docs/console-*.png) are written here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from mesh_helpers import apply, http
from snapshot_docs import service

from nodeagent.console.rollouts import PREFIX as ROLLOUTS
from nodeagent.demo import backend
from nodeagent.inpod.netns import Netns
from nodeagent.sandbox import Pod, Sandbox
from nodeagent.store import keys, open_store
from nodeagent.store.codec import decode, encode

pytestmark = [pytest.mark.root, pytest.mark.slow]
NAME = f"co{os.getpid() % 100000}"
VIP = "10.96.83.10"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[2] / "docs"
BACKEND = str(Path(backend.__file__).resolve())
REFRESH = 1.0  # the sandbox console's --refresh
T = TypeVar("T")

# The demo's backend, but every GET answers 500: a broken version.
FAILING = r"""
import importlib.util, sys
from http.server import ThreadingHTTPServer
spec = importlib.util.spec_from_file_location("backend", sys.argv[1])
backend = importlib.util.module_from_spec(spec)
spec.loader.exec_module(backend)
version = sys.argv[2]
class Failing(backend.handler(version)):
    def do_GET(self):
        body = backend.answer(version, self.path)
        self.send_response(500)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = ThreadingHTTPServer(("0.0.0.0", backend.PORT), Failing)
server.daemon_threads = True
print(f"serving on {backend.PORT}", flush=True)
server.serve_forever()
"""


def doc(kind: str, name: str, spec: dict[str, Any], api: str = "networking.istio.io/v1") -> Any:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def route(weights: dict[str, int]) -> Any:
    return doc(
        "VirtualService",
        "my-app",
        {
            "hosts": ["my-app"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "my-app", "subset": s}, "weight": w}
                        for s, w in weights.items()
                    ]
                }
            ],
        },
    )


def loop(argv: str, n: int) -> list[str]:
    """A bounded request loop for a pod: `n` runs of argv, 50 ms apart."""
    return [
        "sh",
        "-c",
        f"i=0; while [ $i -lt {n} ]; do {argv} >/dev/null 2>&1; "
        "i=$((i+1)); sleep 0.05; done; sleep 3600",
    ]


class Browser:
    """Headless chromium driven from one thread that lives in `netns` (the driver, the browser
    and every WebDriver connection are in that namespace)."""

    def __init__(self, netns: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self._pool = ThreadPoolExecutor(max_workers=1)
        self._ns = Netns.open(f"/run/netns/{netns}")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,900",
            "--no-first-run",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service_ = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
        self.driver = self.run(lambda: webdriver.Chrome(service=service_, options=options))

    def run(self, fn: Callable[[], T]) -> T:
        # A network namespace is per thread: `Netns.run` enters it around `fn` on the worker,
        # so the driver it starts, and every connection to the driver, live in the namespace.
        return self._pool.submit(self._ns.run, fn).result(timeout=60)

    def script(self, js: str) -> Any:
        return self.run(lambda: self.driver.execute_script(js))

    def click(self, selector: str) -> None:
        """A click in one script: the graph is redrawn every refresh, so a WebDriver element
        handle could go stale between finding and clicking it."""
        found = self.script(
            f"const e = document.querySelector({json.dumps(selector)});"
            "if (e) e.dispatchEvent(new MouseEvent('click', {bubbles: true})); return !!e;"
        )
        assert found, f"nothing matches {selector}"

    def close(self) -> None:
        try:
            self.run(self.driver.quit)
        finally:
            self._pool.shutdown()
            self._ns.close()


def wait_for(get: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.1)  # polling a real browser


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("console")
    (d / "failing.py").write_text(FAILING)
    return d


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(tool):
            pytest.fail(
                f"{tool} is missing: the console test needs Debian's chromium and "
                "chromium-driver (scripts/bootstrap installs them)"
            )
    sb = Sandbox.up(NAME, nodes=2, store="sqlite", progress=False, gateway="n1")
    try:
        yield sb
    finally:
        sb.down()


@pytest.fixture(scope="module")
def mesh(sandbox: Sandbox, files: Path) -> Iterator[dict[str, Pod]]:
    pods = {}
    for v in ("v1", "v2"):
        pods[v] = sandbox.pod_add(
            "n2",
            "default",
            f"my-app-{v}",
            [sys.executable, "-I", BACKEND, v],
            service_account="my-app",
            labels={"app": "my-app", "version": v},
        )
    pods["v3"] = sandbox.pod_add(
        "n2",
        "default",
        "my-app-v3",
        [sys.executable, "-I", str(files / "failing.py"), BACKEND, "v3"],
        service_account="my-app",
        labels={"app": "my-app", "version": "v3"},
    )
    gateway = doc(
        "Gateway",
        "web",
        {
            "selector": {"istio": "ingressgateway"},
            "servers": [
                {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}
            ],
        },
    )
    via_gateway = doc(
        "VirtualService",
        "my-app-gateway",
        {
            "hosts": ["*"],
            "gateways": ["web"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "my-app", "subset": "v1", "port": {"number": 80}}}
                    ]
                }
            ],
        },
    )
    # meshctl refuses an undefined subset of a host that has a DestinationRule; one for a host
    # without any (yet) is accepted, as Istio does, and the console flags it.
    broken = doc(
        "VirtualService",
        "broken-route",
        {
            "hosts": ["ratings"],
            "http": [{"route": [{"destination": {"host": "ratings", "subset": "v7"}}]}],
        },
    )
    subsets = doc(
        "DestinationRule",
        "my-app",
        {
            "host": "my-app",
            "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2", "v3")],
        },
    )
    apply(
        sandbox,
        files,
        "mesh",
        [
            service("my-app", cluster_ip=VIP),
            service("ratings"),
            subsets,
            route({"v1": 50, "v2": 50}),
            gateway,
            via_gateway,
            broken,
        ],
    )
    curl = "curl -s -o /dev/null --max-time 2"
    pods["client"] = sandbox.pod_add(
        "n1",
        "default",
        "client",
        loop(f"{curl} http://{VIP}/", 1500),
        service_account="client",
        labels={"app": "client"},
    )
    out = sandbox.popen(
        "outside",
        loop(f"{curl} {sandbox.gateway_url()}/", 600),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield pods
    out.terminate()
    out.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(sandbox: Sandbox) -> Iterator[Browser]:
    b = Browser(sandbox.netns_of("outside"))
    try:
        yield b
    finally:
        b.close()


async def _put_rollout(store_url: str) -> None:
    now = time.time()
    record = {
        "phase": "Progressing",
        "host": "my-app.default.svc.cluster.local",
        "stable": "v1",
        "canary": "v2",
        "weight": 20,
        "failedChecks": 0,
        "iteration": 2,
        "lastAnalysis": {"request-success-rate": 99.5, "request-duration-p99": 41.0},
        "events": [
            {"time": now - 30, "message": "canary weight 10"},
            {"time": now - 5, "message": "canary weight 20"},
        ],
        "history": [
            {"time": now - 30, "weight": 10, "analysis": {"request-success-rate": 100.0}},
            {"time": now - 5, "weight": 20, "analysis": {"request-success-rate": 99.5}},
        ],
        "updated": now,
    }
    store = await open_store(store_url)
    try:
        await store.put(ROLLOUTS + "default/my-app", encode(record))
    finally:
        await store.aclose()


NODES = (
    "return [...document.querySelectorAll('#graph .node')]"
    ".map(n => [n.dataset.id, n.dataset.health])"
)
EDGES = (
    "return [...document.querySelectorAll('#graph .edge')]"
    ".map(e => [e.dataset.source, e.dataset.target, Number(e.dataset.rate), e.dataset.mtls])"
)
FINDING = (
    "const r = document.querySelector('#tab-health tr.finding[data-ref=\"default/broken-route\"]');"
)
ROLLOUT = "const r = document.querySelector('#tab-rollouts .rollout[data-ref=\"default/my-app\"]');"


@pytest.fixture(scope="module")
def page(sandbox: Sandbox, mesh: dict[str, Pod], browser: Browser) -> Browser:
    """The console open in the browser, at the URL `scripts/sandbox console-url` prints."""
    url = sandbox.console_url()
    assert url.startswith("http://10.200.0.")  # the console's own namespace, on the underlay
    browser.run(lambda: browser.driver.get(url))
    # the token link set the cookie and left the address bar
    assert "token=" not in browser.run(lambda: browser.driver.current_url)
    return browser


def test_the_graph_shows_the_services_versions_and_rated_edges(page: Browser) -> None:
    want_nodes = {
        "svc:default/my-app", "wl:default/my-app-v1", "wl:default/my-app-v2",
        "wl:default/my-app-v3", "wl:default/client", "gateway",
    }  # fmt: skip
    want_edges = {
        ("wl:default/client", "svc:default/my-app"),
        ("svc:default/my-app", "wl:default/my-app-v1"),
        ("svc:default/my-app", "wl:default/my-app-v2"),
        ("gateway", "svc:default/my-app"),
    }

    def ready() -> bool:
        nodes = set(dict(page.script(NODES)))
        rated = {(s, t) for s, t, rate, _ in page.script(EDGES) if rate > 0}
        return want_nodes <= nodes and want_edges <= rated

    wait_for(ready, "my-app v1/v2/v3, the client, the gateway, and rated edges", 40)
    nodes = dict(page.script(NODES))
    assert nodes["wl:default/my-app-v1"] == "healthy"
    assert nodes["wl:default/my-app-v3"] == "idle"  # no route sends it anything yet
    edges = page.script(EDGES)
    assert all(mtls == "true" for *_, mtls in edges)  # every hop is a mesh tunnel


def test_agents_publish_where_their_metrics_are(sandbox: Sandbox, page: Browser) -> None:
    async def records() -> dict[str, str]:
        store = await open_store(sandbox.store_url)
        try:
            return {
                n.name: decode(kv)["metrics"]
                for n in sandbox.nodes()
                if (kv := await store.get(keys.node(n.name))) is not None
            }
        finally:
            await store.aclose()

    assert trio.run(records) == {n.name: f"{n.underlay_ip}:15020" for n in sandbox.nodes()}
    agents = page.script(
        "return [...document.querySelectorAll('#tab-agents tr')].slice(1)"
        ".map(r => r.children[0].textContent + ' ' + r.children[3].textContent)"
    )
    assert sorted(agents) == ["n1 ", "n2 "]  # both scraped, no scrape error


def test_a_version_answering_500_turns_failing_within_the_refresh(
    sandbox: Sandbox, mesh: dict[str, Pod], page: Browser
) -> None:
    apply(sandbox, Path(mesh["v3"].log).parent, "route-v3", [route({"v1": 34, "v2": 33, "v3": 33})])

    def v3_answered() -> bool:
        return any(http(sandbox, mesh["client"], f"http://{VIP}/")[0] == 500 for _ in range(6))

    wait_for(v3_answered, "a 500 from v3 through the mesh", 20)
    routed = time.monotonic()
    wait_for(
        lambda: dict(page.script(NODES)).get("wl:default/my-app-v3") == "failing",
        "v3 failing in the graph",
        10,
    )
    took = time.monotonic() - routed
    print(f"v3 failing in the browser {took:.2f}s after its first 500")
    # the next scrape (≤ REFRESH), the page's next poll (≤ REFRESH), a scrape's own time
    assert took <= 3 * REFRESH + 1.0


def test_a_missing_subset_is_listed_under_config_health_by_name(page: Browser) -> None:
    page.click("button[data-tab=health]")
    kind, check, text = wait_for(
        lambda: page.script(
            FINDING + "return r && [r.dataset.kind, r.dataset.check, r.textContent];"
        ),
        "broken-route under config health",
    )
    assert (kind, check) == ("VirtualService", "undefined-subset")
    assert "v7" in text


def test_the_service_details_show_versions_and_routes(page: Browser) -> None:
    page.click("#graph .node[data-id='svc:default/my-app']")
    text = wait_for(
        lambda: page.script(
            "const d = document.getElementById('details');"
            "return d.textContent.includes('traffic share') && d.textContent;"
        ),
        "the service's details",
    )
    assert "my-app-v3" in text
    assert "routed by default/my-app" in text  # explain's summary of the rule
    # the backends' certificate, from the CA's record in the store, with its expiry
    assert "spiffe://cluster.local/ns/default/sa/my-app" in text
    assert "in 2" in text  # the sandbox CA's 24 h certificates: "in 23.9 h" / "in 24.0 h"
    page.run(lambda: page.driver.save_screenshot(str(DOCS / "console-graph.png")))


def test_the_rollouts_panel_shows_a_status_record(sandbox: Sandbox, page: Browser) -> None:
    # The record is written by hand, with no Rollout behind it: the sandbox's controller would
    # remove it as the status of a deleted Rollout, so it is stopped for this test.
    sandbox.stop_controller()
    try:
        trio.run(_put_rollout, sandbox.store_url)
        _rollouts_panel_shows_it(page)
    finally:
        sandbox.start_controller()


def _rollouts_panel_shows_it(page: Browser) -> None:
    page.click("button[data-tab=rollouts]")
    weight = wait_for(
        lambda: page.script(ROLLOUT + "return r && r.querySelector('.weight').textContent;"),
        "the rollout in its panel",
    )
    assert weight == "20%"
    history = page.script(ROLLOUT + "return r.textContent;")
    assert "canary weight 10" in history
    page.run(lambda: page.driver.save_screenshot(str(DOCS / "console-rollouts.png")))


def test_no_console_errors(page: Browser) -> None:
    logs = page.run(lambda: page.driver.get_log("browser"))
    errors = [entry for entry in logs if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == [], json.dumps(errors, indent=1)
