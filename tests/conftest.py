"""Suite-wide rules: root-needing tests fail loudly (never skip) without their prerequisites."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None:
        return
    if os.geteuid() != 0:
        pytest.fail(f"{item.nodeid} needs root (network namespaces, netfilter); run as root")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{item.nodeid} needs {tool!r}; run scripts/bootstrap")


@pytest.fixture(autouse=True)
def _default_logging() -> None:
    """Every test starts with the agent's default logging (info, JSON, to stderr): a test that
    changes the level (the admin socket's /logging does) must not silence the next one."""
    from nodeagent import log

    log.configure("info", "json")
