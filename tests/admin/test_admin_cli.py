"""The admin endpoints and `nodeagent admin …` against a real admin socket on a temp path."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nodeagent.admin import cli
from nodeagent.admin.routes import AdminSources, admin_routes
from nodeagent.httpserver import UnixSocketHttpServer
from nodeagent.telemetry.metrics import IstioMetrics, MetricsRegistry, peer_labels

WORKLOADS = [
    {
        "uid": "u-1",
        "namespace": "shop",
        "name": "my-app-v1-5d4f6b7c9-abcde",
        "addresses": ["10.0.1.5"],
        "service_account": "my-app",
        "state": "enrolled",
        "connections": {"inbound": {"opened": 3}},
    }
]
CERTS = [
    {
        "identity": "spiffe://cluster.local/ns/shop/sa/my-app",
        "serial": "5a3f",
        "not_after": "2026-11-25T08:00:00+00:00",
        "expires_in_seconds": 86000,
        "private_key_pem": "-----BEGIN PRIVATE KEY-----",
    }
]


class Agent:
    def __init__(self) -> None:
        self.ready = True
        self.levels: list[str] = []
        self.drains: list[tuple[float, bool]] = []
        self.registry = MetricsRegistry()
        metrics = IstioMetrics(self.registry)
        peer = peer_labels(
            reporter="destination", source=None, destination=None, service=None, protocol="http"
        )
        metrics.record_request(
            peer, response_code=200, duration_ms=2, request_bytes=1, response_bytes=1
        )

    def sources(self) -> AdminSources:
        return AdminSources(
            ready=lambda: self.ready,
            config_dump=lambda: {
                "node": "node-1",
                "ready": self.ready,
                "snapshot": {"revision": 17, "services": 2},
                "signing_key": "must not leak",
            },
            workloads=lambda: WORKLOADS,
            certs=lambda: CERTS,
            drain=lambda deadline, park: self.drains.append((deadline, park)),
            registry=self.registry,
            set_log_level=self.levels.append,
        )


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[Path, Agent]]:
    sock = tmp_path / "admin.sock"
    agent = Agent()
    async with trio.open_nursery() as nursery:
        await nursery.start(UnixSocketHttpServer(sock, admin_routes(agent.sources())).run)
        yield sock, agent
        nursery.cancel_scope.cancel()


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await trio.to_thread.run_sync(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def curl(sock: Path, path: str, *extra: str) -> tuple[int, str]:
    proc = await trio.run_process(
        [
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
            *extra,
            "--unix-socket",
            str(sock),
            f"http://a{path}",
        ],
        capture_stdout=True,
        check=False,
    )
    body, _, code = proc.stdout.decode().rpartition("\n")
    return int(code), body


async def test_workloads_table_and_json(
    admin: tuple[Path, Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, _ = admin
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "workloads")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == [
        "NAMESPACE",
        "NAME",
        "ADDRESSES",
        "SERVICE",
        "ACCOUNT",
        "STATE",
        "UID",
    ]
    assert row.split() == [
        "shop",
        "my-app-v1-5d4f6b7c9-abcde",
        "10.0.1.5",
        "my-app",
        "enrolled",
        "u-1",
    ]
    assert header.index("STATE") == row.index("enrolled")  # columns line up
    code, out, _ = await run_cli(capsys, "workloads", "--socket", str(sock), "-o", "json")
    assert code == 0
    assert json.loads(out) == WORKLOADS


async def test_certs_never_show_private_keys(
    admin: tuple[Path, Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, _ = admin
    code, out, err = await run_cli(capsys, "--socket", str(sock), "certs")
    assert (code, err) == (0, "")
    assert "5a3f" in out
    assert "spiffe://cluster.local/ns/shop/sa/my-app" in out
    code, out, err = await run_cli(capsys, "--socket", str(sock), "-o", "json", "certs")
    assert (code, err) == (0, "")
    (cert,) = json.loads(out)
    assert "private_key_pem" not in cert
    assert cert["serial"] == "5a3f"
    table = cli.certs_table(
        [{"identity": "id", "serial": "1", "not_after": "2026-01-01T00:01:40+00:00"}],
        now=1767225600.0,  # 2026-01-01T00:00:00Z
    )
    assert table.splitlines()[1].split() == ["id", "1", "2026-01-01T00:01:40+00:00", "100", "-"]
    code, body = await curl(sock, "/config_dump")
    assert code == 200
    assert "PRIVATE" not in body
    assert "must not leak" not in body


async def test_config_dump_has_snapshot_workloads_and_certs(
    admin: tuple[Path, Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, _ = admin
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "-o", "json", "config-dump")
    dump: dict[str, Any] = json.loads(out)
    assert dump["snapshot"]["revision"] == 17
    assert dump["workloads"][0]["uid"] == "u-1"
    assert dump["certificates"][0]["serial"] == "5a3f"
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "config-dump")
    assert code == 0
    assert "node-1" in out
    assert "revision" in out
    assert "17" in out
    assert "workloads:" in out
    assert "my-app-v1-5d4f6b7c9-abcde" in out


async def test_stats_table_and_json(
    admin: tuple[Path, Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, _ = admin
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "stats")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["METRIC", "LABELS", "VALUE"]
    requests = [r for r in rows if r[0] == "istio_requests_total"]
    assert requests == [
        ["istio_requests_total", "reporter=destination,request_protocol=http,response_code=200,"
         "connection_security_policy=none", "1"],
    ]  # fmt: skip
    assert not any(r[0].endswith("_bucket") for r in rows)
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "stats", "-o", "json")
    samples = json.loads(out)
    assert any(s["name"] == "istio_request_duration_milliseconds_bucket" for s in samples)


async def test_log_level_changes_at_run_time(
    admin: tuple[Path, Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, agent = admin
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "log-level")
    assert (code, out) == (0, "log level: info\n")
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "log-level", "debug")
    assert (code, out) == (0, "log level: info -> debug\n")
    assert agent.levels == ["debug"]
    code, body = await curl(sock, "/logging?level=debug")
    assert code == 400  # a GET never changes anything
    assert "POST" in body
    code, body = await curl(sock, "/logging?level=loud", "-X", "POST")
    assert code == 400
    assert "unknown log level 'loud'" in body
    assert agent.levels == ["debug"]


async def test_drain_calls_the_agent_with_the_deadline(
    admin: tuple[Path, Agent], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, agent = admin
    code, out, _ = await run_cli(capsys, "--socket", str(sock), "drain", "--deadline", "2.5")
    assert (code, out) == (0, "draining: the agent exits within 2.5 s\n")
    assert agent.drains == [(2.5, False)]
    code, _ = await curl(sock, "/quitquitquit")
    assert code == 405  # GET must not stop the agent
    code, _ = await curl(sock, "/quitquitquit?deadline=-1", "-X", "POST")
    assert code == 400
    code, _ = await curl(sock, "/quitquitquit", "-X", "POST")
    assert code == 200
    # A successor's --takeover: drain, then park until SIGTERM.
    code, body = await curl(sock, "/quitquitquit?deadline=3&then=park", "-X", "POST")
    assert code == 200
    assert '"then": "park"' in body
    code, body = await curl(sock, "/quitquitquit?then=sleep", "-X", "POST")
    assert code == 400
    assert "only exit or park" in body
    assert agent.drains == [(2.5, False), (5.0, False), (3.0, True)]


async def test_readiness_over_curl(admin: tuple[Path, Agent]) -> None:
    sock, agent = admin
    assert await curl(sock, "/healthz/ready") == (200, "ready\n")
    agent.ready = False
    assert await curl(sock, "/healthz/ready") == (503, "starting\n")


async def test_missing_and_refused_socket_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run_cli(capsys, "--socket", str(tmp_path / "nope.sock"), "workloads")
    assert (code, out) == (1, "")
    assert err == (
        f"nodeagent admin: admin socket {tmp_path / 'nope.sock'} does not exist: "
        "is the agent running on this node? (--socket PATH)\n"
    )
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))  # bound but never listening: connect() is refused
    try:
        code, _, err = await run_cli(capsys, "--socket", str(dead), "certs")
    finally:
        s.close()
    assert code == 1
    assert "refused the connection" in err
    assert "Traceback" not in err


def test_workers_table_lists_each_process_or_says_in_process() -> None:
    assert cli.workers_table({"workers": 1, "processes": []}) == (
        "workers: 1 (the pods are served in the agent's own process)\n"
    )
    text = cli.workers_table(
        {
            "workers": 2,
            "processes": [
                {"slot": 0, "pid": 41, "up": True, "incarnation": 2, "restarts": 1, "pods": 3,
                 "connections": 250, "snapshot_revision": 17},
                {"slot": 1, "pid": 42, "up": False, "incarnation": 1, "restarts": 0, "pods": 0,
                 "connections": 0, "snapshot_revision": 0},
            ],
        }
    )  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "workers: 2"
    assert lines[1].split() == [
        "SLOT", "PID", "UP", "INCARNATION", "RESTARTS", "PODS", "CONNECTIONS", "REVISION"
    ]  # fmt: skip
    assert lines[2].split() == ["0", "41", "yes", "2", "1", "3", "250", "17"]
    assert lines[3].split() == ["1", "42", "no", "1", "0", "0", "0", "0"]
