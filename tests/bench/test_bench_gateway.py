"""The gateway bench's pure pieces: HAProxy accepts its configuration; the tools' rates parse."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nodeagent.bench.gateway import _haproxy_config, _hey_rate, _wrk_rate
from nodeagent.sandbox.certs import FileCa


def test_haproxy_accepts_the_tls_frontend(tmp_path: Path) -> None:
    FileCa(tmp_path / "ca").issue(tmp_path / "cert", "bench.example.com")
    pem = tmp_path / "h.pem"
    pem.write_bytes(
        (tmp_path / "cert" / "tls.crt").read_bytes() + (tmp_path / "cert" / "tls.key").read_bytes()
    )
    cfg = tmp_path / "h.cfg"
    cfg.write_text(_haproxy_config(pem, "10.201.2.2", "127.0.0.1"))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_rates_parse() -> None:
    assert _hey_rate("Summary:\n  Requests/sec:\t421.5321\n") == 421.5321
    assert _wrk_rate("Requests/sec:   1462.07\nTransfer/sec: 1MB\n") == 1462.07
