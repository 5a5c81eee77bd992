"""Fixtures for the CNI tests: short socket paths, a recording handler, a running CniServer."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cni_fakes import RecordingHandler

from nodeagent.cni.server import CniServer


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="cni-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
async def server(sock_dir: Path, handler: RecordingHandler, nursery: trio.Nursery) -> CniServer:
    srv = CniServer(sock_dir / "cni.sock", handler, timeout=5.0)
    await nursery.start(srv.run)
    return srv
