"""Slow requests on a 2-node sandbox (issue 21 item 4), with real trickling clients: the agents
run with `--http-request-headers-timeout 3 --http-stream-idle-timeout 0.9`.

Through the mesh (a meshed pod on n1 calling `rec` on n2) and through n1's gateway (from the
outside host): a request head trickled one header line a second is answered 408 and closed
after ~3 s (flag DT); a body trickled one byte a second is answered 408 and closed (flag SI);
an upstream that never answers gets the client a 408 (SI), one that stops mid-body a cut
response. The access log has each flag.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hardening_helpers import (
    GW_HOST,
    PROGRAMS,
    recorder_behind_gateway,
)
from mesh_helpers import eventually, http, json_lines, sandbox_fixture

from nodeagent.sandbox import Pod, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]
NODEAGENT = str(Path(sys.prefix) / "bin" / "nodeagent")
AGENT = [NODEAGENT, "run", "--http-request-headers-timeout", "3", "--http-stream-idle-timeout",
         "0.9"]  # fmt: skip
sandbox = sandbox_fixture("sc", gateway="n1", agent_cmd=AGENT)
VIP = "10.96.92.10"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slow")


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path) -> dict[str, Pod]:
    return recorder_behind_gateway(sandbox, files, prefix="sc", vip=VIP, routes=[])


def _trickle(sb: Sandbox, target: str | Pod, files: Path, mode: str) -> dict[str, Any]:
    if isinstance(target, Pod):
        host, authority = VIP, "rec"
    else:
        host, authority = sb.gateway_url().split("//")[1].rsplit(":", 1)[0], GW_HOST
    r = sb.exec(
        target, ["python3", str(PROGRAMS / "trickle.py"), host, "80", mode, authority], timeout=90
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(str(r.stdout).strip().splitlines()[-1])
    return result


def _flags(sb: Sandbox, path: str) -> list[tuple[int, str]]:
    lines = json_lines(sb.node("n1").agent_log, "access.request")
    return [(x["response_code"], x["response_flags"]) for x in lines if x["path"] == path]


@pytest.mark.parametrize("where", ["mesh", "gateway"])
def test_header_trickle_is_cut_by_the_request_headers_timeout(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path, where: str
) -> None:
    target: str | Pod = pods["client"] if where == "mesh" else "outside"
    got = _trickle(sandbox, target, files, "head")
    assert got["received"].startswith("HTTP/1.1 408 "), got
    assert got["closed"], got
    assert 2.5 <= got["seconds"] < 8, got  # 3 s from the first byte, not the trickle's 30 s


@pytest.mark.parametrize("where", ["mesh", "gateway"])
def test_body_trickle_is_cut_by_the_stream_idle_timeout(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path, where: str
) -> None:
    target: str | Pod = pods["client"] if where == "mesh" else "outside"
    before = len(_flags(sandbox, "/trickle"))
    got = _trickle(sandbox, target, files, "body")
    assert got["received"].startswith("HTTP/1.1 408 "), got
    assert got["closed"], got
    assert got["seconds"] < 8, got

    def logged() -> bool:
        return (408, "SI") in _flags(sandbox, "/trickle")[before:]

    eventually(logged, "an access line for the body trickle: 408 SI")


def test_header_trickle_is_logged_408_dt(sandbox: Sandbox, pods: dict[str, Pod]) -> None:
    # The trickled heads above never completed, so their records have no path ("-").
    eventually(lambda: (408, "DT") in _flags(sandbox, "-"), "an access line: 408 DT")


def test_stalled_upstream_is_cut_by_the_stream_idle_timeout(
    sandbox: Sandbox, pods: dict[str, Pod]
) -> None:
    code, _, waited = http(sandbox, pods["client"], f"http://{VIP}/stall", timeout=20)
    assert code == 408
    assert waited < 10
    code, body, waited = http(sandbox, pods["client"], f"http://{VIP}/stall-body", timeout=20)
    assert code == 200  # the head had gone out: the cut shows as a short body
    assert body == "half."
    assert waited < 10
    eventually(lambda: (408, "SI") in _flags(sandbox, "/stall"), "an access line: /stall 408 SI")
    eventually(
        lambda: (200, "SI") in _flags(sandbox, "/stall-body"), "an access line: /stall-body SI"
    )
