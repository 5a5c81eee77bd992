"""A pod's own `mesh.nodeagent.io/destination-l7` annotation over the agent's `--destination-l7`
(docs/dataplane.md, "Only where needed"): `when-needed` on a pod of an `always` agent, `always`
on a pod of a `when-needed` agent, and a value the mesh does not know refused at enrollment.

2-node sandbox, agents with the default (`always`) until the last test restarts n2's with
`when-needed`: the client pod on n1; on n2 `plain` (no annotation), `lean` (`when-needed`) and
`full` (`always`), each behind a Service of its own. The backends answer with the
`x-forwarded-client-cert` they got, which only the destination's HTTP view sets, so every
answer says whether n2 parsed the request.
"""

from __future__ import annotations

import subprocess

import pytest
from destination_helpers import XFCC_APP, scrape
from mesh_helpers import admin, apply, eventually, http, sandbox_fixture, wait_config
from snapshot_docs import service

from nodeagent.proxy.inbound import DESTINATION_L7_ANNOTATION
from nodeagent.sandbox import Pod, Sandbox, SandboxError
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("do")
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
VIPS = {"plain": "10.96.86.10", "lean": "10.96.86.11", "full": "10.96.86.12"}
MODES = {"plain": None, "lean": "when-needed", "full": "always"}


@pytest.fixture(scope="module")
def client(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Pod:
    d = tmp_path_factory.mktemp("destination-l7-override")
    (d / "app.py").write_text(XFCC_APP)
    pod = sandbox.pod_add("n1", "default", "client", ["sleep", "3600"], service_account="client")
    for name, mode in MODES.items():
        sandbox.pod_add(
            "n2", "default", name, ["python3", str(d / "app.py")], service_account=name,
            labels={"app": name}, annotations={DESTINATION_L7_ANNOTATION: mode} if mode else None,
        )  # fmt: skip
    apply(sandbox, d, "svc", [service(n, cluster_ip=ip) for n, ip in VIPS.items()])
    for node in ("n1", "n2"):
        wait_config(sandbox, node)
    for name, ip in VIPS.items():
        eventually(lambda ip=ip: http(sandbox, pod, f"http://{ip}/")[0] == 200, f"{name} up")
    return pod


def parsed_by_n2(sb: Sandbox, client: Pod, name: str) -> bool:
    """Whether n2 parsed a request to `name` (XFCC set, counted with reporter="destination")."""
    before = destination_requests(sb, name)
    code, body, _ = http(sb, client, f"http://{VIPS[name]}/")
    assert code == 200, (name, body)
    counted = destination_requests(sb, name) - before
    if body.startswith("xfcc=- "):
        assert counted == 0, f"{name}: relayed at L4 but counted by the destination"
        return False
    assert f"URI={CLIENT_ID}" in body, (name, body)
    assert counted == 1, f"{name}: parsed but counted {counted} times by the destination"
    return True


def destination_requests(sb: Sandbox, name: str) -> float:
    return sum(
        s.value
        for s in samples(scrape(sb, "n2"), "istio_requests_total")
        if s.labels.get("reporter") == "destination"
        and s.labels.get("destination_workload") == name
    )


def modes_on_n2(sb: Sandbox) -> dict[str, str]:
    return {p["name"]: p["destination_l7"] for p in admin(sb, "n2", "/pods")}


def test_a_pod_can_opt_out_of_the_destination_l7_of_an_always_agent(
    sandbox: Sandbox, client: Pod
) -> None:
    assert {n: parsed_by_n2(sandbox, client, n) for n in VIPS} == {
        "plain": True,
        "lean": False,
        "full": True,
    }
    assert modes_on_n2(sandbox) == {"plain": "always", "lean": "when-needed", "full": "always"}


def test_a_value_the_mesh_does_not_know_is_refused_at_enrollment(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match=f"{DESTINATION_L7_ANNOTATION}='sometimes'"):
        sandbox.pod_add(
            "n2", "default", "odd", ["sleep", "3600"],
            annotations={DESTINATION_L7_ANNOTATION: "sometimes"},
        )  # fmt: skip
    assert all(p.name != "odd" for p in sandbox.pods())
    assert "odd" not in modes_on_n2(sandbox)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not [n for n in netns.stdout.split() if n.startswith(sandbox.name) and "odd" in n]


def test_a_pod_can_ask_for_the_destination_l7_of_a_when_needed_agent(
    sandbox: Sandbox, client: Pod
) -> None:
    sandbox.stop_agent("n2")
    sandbox.start_agent("n2", args=["--destination-l7", "when-needed"])
    try:
        wait_config(sandbox, "n2")
        assert modes_on_n2(sandbox) == {
            "plain": "when-needed",
            "lean": "when-needed",
            "full": "always",
        }
        # The source's pooled streams died with n2's agent: the first request may find one.
        eventually(lambda: http(sandbox, client, f"http://{VIPS['full']}/")[0] == 200, "n2 back")
        assert {n: parsed_by_n2(sandbox, client, n) for n in VIPS} == {
            "plain": False,
            "lean": False,
            "full": True,
        }
    finally:
        sandbox.stop_agent("n2")
        sandbox.start_agent("n2", args=[])
