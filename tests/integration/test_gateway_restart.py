"""The ingress gateway across a graceful agent restart (docs/dataplane.md, "Restarts"): its
listeners are SO_REUSEPORT like the pods', so the new agent's gateway binds beside the draining
one, which keeps accepting until the new agent is ready; no request from the outside host fails,
whether the old agent is stopped first or taken over (--takeover).

n1's agent runs the gateway; the backend is on n2, so restarting n1's agent touches only the
gateway's side (its listeners, its HTTP proxy, its HBONE connections to n2).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mesh_helpers import admin, apply, http, http_gateway, restart_under_load, sandbox_fixture
from snapshot_docs import service

import nodeagent.demo.backend
from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("gr", gateway="n1")
BACKEND = ["python3", "-I", str(Path(nodeagent.demo.backend.__file__)), "v1", "8080"]
GATEWAY = http_gateway("web-gateway")
ROUTE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {
        "hosts": ["*"],
        "gateways": ["web-gateway"],
        "http": [{"route": [{"destination": {"host": "web", "port": {"number": 80}}}]}],
    },
}


@pytest.fixture(scope="module")
def backend(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Pod:
    pod = sandbox.pod_add("n2", "default", "web", BACKEND, labels={"app": "web"})
    files = tmp_path_factory.mktemp("gateway-restart")
    apply(sandbox, files, "web", [service("web", cluster_ip="10.96.81.10"), GATEWAY, ROUTE])
    url = sandbox.gateway_url()
    deadline = time.monotonic() + 30
    while http(sandbox, "outside", url)[0] != 200:
        assert time.monotonic() < deadline, f"{url} never answered through the gateway"
        time.sleep(0.25)
    return pod


@pytest.mark.parametrize("takeover", [False, True], ids=["sigterm-first", "takeover"])
def test_gateway_restart_under_load_fails_no_request(
    sandbox: Sandbox, backend: Pod, takeover: bool
) -> None:
    url = sandbox.gateway_url()
    results, _ = restart_under_load(sandbox, "outside", url, "n1", takeover=takeover)
    print(f"gateway across the restart: {results}")
    for name, (ok, failed, errors) in results.items():
        assert failed == 0, f"{name}: {failed} failed gateway requests in the restart: {errors}"
        assert ok >= 100, f"{name}: only {ok} requests answered"  # the load really ran
    # The new agent's gateway serves (it took the port beside the old one).
    stats = admin(sandbox, "n1", "/config_dump")["gateway"]
    assert stats is not None
    assert 80 in {int(p) for p in stats["listening"]}, stats
    assert http(sandbox, "outside", url)[0] == 200
