"""What a worker process is told at start (the control's `hello`): the agent flags the data
plane reads. Sent pickled inside the first frame: both ends are the same program, and the
fields are our own frozen types (`http.Limits`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.http import Limits
from nodeagent.proxy.outbound import OutboundPolicy

# `--workers` default: the cores this process may run on, at most this many (beyond it the
# control process's snapshot and identity fan-out, and memory per worker, outgrow the gain).
MAX_DEFAULT_WORKERS = 8
# How often each worker reports its counters (a kill -9 loses at most this much of them).
REPORT_INTERVAL = 0.25


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(text: str) -> int | None:
    """Whole cores a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD") allows, rounded up."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def default_workers(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on (its affinity, and its cgroup's CPU quota: a
    container's limit), at most MAX_DEFAULT_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except OSError:
        cores = os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit(cpu_max.read_text())
    except OSError:
        limit = None
    if limit is not None:
        cores = min(cores, limit)
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    node: str
    trust_domain: str = "cluster.local"
    outbound_policy: OutboundPolicy = "ALLOW_ANY"
    http_limits: Limits = field(default_factory=Limits)
    zipkin_url: str | None = None
    sample_rate: float = 0.01
    log_level: str = "info"
    log_format: str = "json"
    report_interval: float = REPORT_INTERVAL
