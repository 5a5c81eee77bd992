"""`--workers` default: the usable cores, bounded by a cgroup CPU quota and by the cap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeagent.workers.config import MAX_DEFAULT_WORKERS, cgroup_cpu_limit, default_workers


@pytest.mark.parametrize(
    ("text", "cores"),
    [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("400000 100000", 4),
     ("garbage", None), ("0 100000", None)],
)  # fmt: skip
def test_cgroup_quota_in_whole_cores(text: str, cores: int | None) -> None:
    assert cgroup_cpu_limit(text) == cores


def test_default_is_affinity_bounded_by_quota_and_cap(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    none = tmp_path / "absent"
    assert default_workers(none) == min(affinity, MAX_DEFAULT_WORKERS)
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")
    assert default_workers(quota) == 1
