"""HTTP hardening on a 2-node sandbox, real clients and a backend that records every byte
(issue 21 items 2, 10, 12).

A meshed client pod on n1 and the outside host (through n1's ingress gateway) send the
smuggling corpus (tests/http/smuggling_corpus.json) one raw write per case to `rec` on n2: each
attack gets its status (400/501/505) and a closed connection, the backend never sees the
smuggled request (not as a parsed request, not as bytes), the well-framed controls are served.
Under a DestinationRule `maxConnections: 1`, a client that gives up on a 5 s request does not
hold the next one back, and the access log says code 0, flag DC. A fault-aborted request is
labelled with its destination service, and access records carry the client's ip:port.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from hardening_helpers import (
    CORPUS,
    FQDN,
    GW_HOST,
    PROGRAMS,
    TO_REC,
    recorded,
    recorder_behind_gateway,
)
from mesh_helpers import eventually, http, json_lines, sandbox_fixture

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]
sandbox = sandbox_fixture("hh", gateway="n1")
VIP = "10.96.91.10"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    routes = [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "rec", "namespace": "default"},
            "spec": {
                "hosts": ["rec"],
                "http": [
                    {
                        "match": [{"headers": {"x-abort": {"exact": "1"}}}],
                        "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                        "route": TO_REC,
                    },
                    {"route": TO_REC},
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "rec", "namespace": "default"},
            "spec": {
                "host": "rec",
                "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 1}}},
            },
        },
    ]
    return recorder_behind_gateway(sandbox, files, prefix="hh", vip=VIP, routes=routes)


def _run_corpus(
    sb: Sandbox, target: str | Pod, files: Path, host: str, authority: str
) -> list[dict[str, Any]]:
    r = sb.exec(
        target,
        ["python3", str(PROGRAMS / "smuggle.py"), host, "80", str(CORPUS), authority],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in str(r.stdout).splitlines() if line.startswith("{")]


def _check_corpus(results: list[dict[str, Any]], where: str) -> None:
    corpus = json.loads(CORPUS.read_text())
    by_name = {r["name"]: r for r in results}
    assert len(by_name) == len(corpus["attacks"]) + len(corpus["controls"]), where
    for case in corpus["attacks"]:
        got = by_name[case["name"]]
        assert (got["status"], got["closed"], got["answers"]) == (case["status"], True, 1), (
            where,
            case["name"],
            got["received"][:300],
        )
        assert "connection: close" in got["received"].lower(), (where, case["name"])
    for case in corpus["controls"]:
        got = by_name[case["name"]]
        assert (got["status"], got["answers"]) == (200, len(case["paths"])), (where, got)


def test_smuggling_corpus_through_the_mesh_and_the_gateway(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path
) -> None:
    before, _ = recorded(pods["rec"])
    mesh = _run_corpus(sandbox, pods["client"], files, VIP, "rec")
    _check_corpus(mesh, "mesh")
    gateway_ip = sandbox.gateway_url().split("//")[1].rsplit(":", 1)[0]
    edge = _run_corpus(sandbox, "outside", files, gateway_ip, GW_HOST)
    _check_corpus(edge, "gateway")
    reqs, raw = recorded(pods["rec"])
    new = reqs[len(before) :]
    # The controls (two requests each, both paths) reached the backend: it does record.
    assert new.count("POST /first") == 4, new
    assert new.count("GET /second") == 4, new
    smuggled = json.loads(CORPUS.read_text())["smuggled_path"]
    assert not any(smuggled in r for r in reqs)
    assert smuggled not in raw  # not even as bytes of some body


def test_client_that_gives_up_frees_the_only_connection(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    client = pods["client"]
    code, _, waited = http(sandbox, client, f"http://{VIP}/slow", timeout=1)
    assert code == 0  # curl gave up after 1 s of the backend's 5 s
    assert waited < 3
    started = time.monotonic()
    code, body, _ = http(sandbox, client, f"http://{VIP}/next", timeout=10)
    elapsed = time.monotonic() - started
    assert (code, body) == (200, "ok /next")
    # Without the cancel the abandoned request holds the only connection for ~4 more seconds.
    assert elapsed < 2.5, elapsed

    def dc_logged() -> bool:
        lines = json_lines(sandbox.node("n1").agent_log, "access.request")
        return any(
            x["path"] == "/slow" and x["response_code"] == 0 and x["response_flags"] == "DC"
            for x in lines
        )

    eventually(dc_logged, "an access.request line for /slow with code 0, flag DC")


def test_fault_abort_names_its_service_and_records_the_client(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    client = pods["client"]
    code, _, _ = http(sandbox, client, f"http://{VIP}/abort", "x-abort: 1")
    assert code == 418

    def labelled() -> bool:
        url = f"http://{sandbox.node('n1').underlay_ip}:15020/stats/prometheus"
        r = sandbox.exec("outside", ["curl", "-sf", "--max-time", "5", url], timeout=15)
        return any(
            s.labels.get("response_code") == "418"
            and s.labels.get("response_flags") == "FI"
            and s.labels.get("destination_service") == FQDN
            for s in samples(str(r.stdout), "istio_requests_total")
        )

    eventually(labelled, f"istio_requests_total{{response_code=418, destination_service={FQDN}}}")
    lines = [
        x
        for x in json_lines(sandbox.node("n1").agent_log, "access.request")
        if x["path"] == "/abort"
    ]
    assert lines, "no access line for /abort"
    assert lines[-1]["downstream_address"].startswith(f"{client.ip}:"), lines[-1]
