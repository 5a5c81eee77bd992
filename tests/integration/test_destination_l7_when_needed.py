"""`nodeagent run --destination-l7 when-needed` (docs/dataplane.md, "Inbound HTTP"): the
destination relays an HTTP port's tunnel streams at L4 when the source's L7 proxy reports their
requests and no policy of the workload reads requests; it parses them when the source did not
(a pod IP dialled directly, plaintext), and once a policy that reads requests arrives it closes
the streams it relayed, so the next ones are parsed and authorized request by request.

2-node sandbox, both agents with `--destination-l7 when-needed`: the client pod on n1, the
backend on n2. The backend answers with the `x-forwarded-client-cert` it got, which only the
destination's HTTP view sets, so every answer says whether n2 parsed the request.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from destination_helpers import ISSUER, XFCC_APP, Issuer, ap, op, scrape
from mesh_helpers import apply, eventually, http, json_lines, sandbox_fixture, wait_config
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("dw", agent_args=["--destination-l7", "when-needed"])
VIP = "10.96.83.10"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pod]:
    d = tmp_path_factory.mktemp("destination-l7")
    (d / "app.py").write_text(XFCC_APP)
    out = {
        "client": sandbox.pod_add(
            "n1", "default", "client", ["sleep", "3600"], service_account="client"
        ),
        "plain": sandbox.pod_add(
            "n1", "default", "plain", ["sleep", "3600"],
            labels={"istio.io/dataplane-mode": "none"},
        ),
        "web": sandbox.pod_add(
            "n2", "default", "web", ["python3", str(d / "app.py")], service_account="web",
            labels={"app": "web"},
        ),
    }  # fmt: skip
    apply(sandbox, d, "web", [service("web", cluster_ip=VIP)])
    for node in ("n1", "n2"):
        wait_config(sandbox, node)
    eventually(lambda: http(sandbox, out["client"], f"http://{VIP}/up")[0] == 200, "web up")
    return out


def requests(sb: Sandbox, node: str, reporter: str, **labels: str) -> float:
    """istio_requests_total to the web workload as `node` reports it."""
    match = {"reporter": reporter, "destination_workload": "web", **labels}
    return sum(
        s.value
        for s in samples(scrape(sb, node), "istio_requests_total")
        if all(s.labels.get(k) == v for k, v in match.items())
    )


def get(sb: Sandbox, pod: Pod, url: str) -> tuple[int, str]:
    code, body, _ = http(sb, pod, url)
    return code, body


def test_requests_the_source_reports_are_relayed_at_l4(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    src0 = requests(sandbox, "n1", "source")
    dst0 = requests(sandbox, "n2", "destination")
    answers = [get(sandbox, pods["client"], f"http://{VIP}/a{i}") for i in range(3)]
    assert answers == [(200, f"xfcc=- path=/a{i}\n") for i in range(3)]
    assert requests(sandbox, "n1", "source") - src0 == 3
    assert requests(sandbox, "n2", "destination") - dst0 == 0


def test_what_the_source_did_not_parse_is_parsed_at_the_destination(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    web = pods["web"].ip
    mtls0 = requests(sandbox, "n2", "destination", source_principal=CLIENT_ID)
    plain0 = requests(sandbox, "n2", "destination", source_principal="unknown")
    # The pod IP itself: n1 relays it at L4 (no Service VIP to route), so n2 parses it.
    code, body = get(sandbox, pods["client"], f"http://{web}:8080/direct")
    assert code == 200
    assert f"URI={CLIENT_ID}" in body, body
    assert body.endswith(" path=/direct\n"), body
    # Plaintext from outside the mesh (15006): no source agent reported it.
    assert get(sandbox, pods["plain"], f"http://{web}:8080/plain") == (200, "xfcc=- path=/plain\n")
    assert requests(sandbox, "n2", "destination", source_principal=CLIENT_ID) - mtls0 == 1
    assert requests(sandbox, "n2", "destination", source_principal="unknown") - plain0 == 1


def test_a_policy_reading_requests_closes_the_relayed_streams(
    sandbox: Sandbox, pods: dict[str, Pod], tmp_path: Path
) -> None:
    client = pods["client"]
    # The source's pooled tunnel stream to the backend is open and relayed at L4.
    assert get(sandbox, client, f"http://{VIP}/before") == (200, "xfcc=- path=/before\n")
    # A RequestAuthentication denies nothing at L4, so only the re-check of relayed streams
    # (`Peer.deferred_http`) closes that stream: otherwise a bad token would pass on it.
    issuer = Issuer(tmp_path / "jwks.json")
    issuer.publish(k1=issuer.new_key("k1"))
    authn = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "web-jwt", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "jwtRules": [{"issuer": ISSUER, "jwks": issuer.file.read_text()}],
        },
    }
    apply(sandbox, tmp_path, "authn", [authn])
    wait_config(sandbox, "n2")
    log = sandbox.node("n2").agent_log

    def closed() -> bool:
        return any(
            "reads this HTTP port's requests" in line.get("reason", "")
            for line in json_lines(log, "connection.closed_by_policy")
        )

    eventually(closed, "n2 closes the stream it relayed at L4")
    # The next stream is parsed: the app sees XFCC, a token signed by another key is refused.
    code, body = get(sandbox, client, f"http://{VIP}/no-token")
    assert code == 200, body
    assert f"URI={CLIENT_ID}" in body, body
    forged = issuer.token("k1", key=issuer.new_key("other"))  # signed by a key not published
    code, body, _ = http(sandbox, client, f"http://{VIP}/forged", f"Authorization: Bearer {forged}")
    assert code == 401, body
    # And an AuthorizationPolicy on paths applies request by request.
    policy = ap("web-paths", "default", "ALLOW", [op(paths=["/allowed*"])], {"app": "web"})
    apply(sandbox, tmp_path, "policy", [policy])
    wait_config(sandbox, "n2")
    assert get(sandbox, client, f"http://{VIP}/allowed")[0] == 200
    assert get(sandbox, client, f"http://{VIP}/denied") == (403, "RBAC: access denied")
