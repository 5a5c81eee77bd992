"""What a worker process is told at start (the control's `hello`): the agent flags the data
plane reads, as a msgpack map inside the first frame (the channel's wire format, never pickle:
a frame decodes into plain values only). `config_to_wire` / `config_from_wire` are that map's
schema: every field named, typed and checked; an unknown, missing or mistyped field is a
`ConfigError` naming it, and no half-built config comes out."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from nodeagent.http import Limits
from nodeagent.proxy.inbound import DESTINATION_L7_MODES, DestinationL7
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
    destination_l7: DestinationL7 = "always"
    http_limits: Limits = field(default_factory=Limits)
    zipkin_url: str | None = None
    sample_rate: float = 0.01
    log_level: str = "info"
    log_format: str = "json"
    report_interval: float = REPORT_INTERVAL


class ConfigError(ValueError):
    """A worker config map that does not fit the schema (the worker refuses to start)."""


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
# The schema of the map: field → the Python types its value may have on the wire.
_FIELDS: dict[str, tuple[type, ...]] = {
    "node": (str,),
    "trust_domain": (str,),
    "outbound_policy": (str,),
    "destination_l7": (str,),
    "http_limits": (dict,),
    "zipkin_url": (str, type(None)),
    "sample_rate": (float, int),
    "log_level": (str,),
    "log_format": (str,),
    "report_interval": (float, int),
}
_TYPE_NAMES = {type(None): "null", dict: "a map"}
# `http.Limits`: every field a number, ints stay ints (floats accept an int on the wire).
_LIMIT_TYPES: dict[str, tuple[type, ...]] = {
    f.name: (int,) if isinstance(f.default, int) else (float, int)
    for f in dataclasses.fields(Limits)
}


def config_to_wire(cfg: WorkerConfig) -> dict[str, Any]:
    """The config as the hello's msgpack map (plain values only)."""
    return {
        "node": cfg.node,
        "trust_domain": cfg.trust_domain,
        "outbound_policy": cfg.outbound_policy,
        "destination_l7": cfg.destination_l7,
        "http_limits": {name: getattr(cfg.http_limits, name) for name in _LIMIT_TYPES},
        "zipkin_url": cfg.zipkin_url,
        "sample_rate": cfg.sample_rate,
        "log_level": cfg.log_level,
        "log_format": cfg.log_format,
        "report_interval": cfg.report_interval,
    }


def _check_map(value: Any, schema: dict[str, tuple[type, ...]], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is a {type(value).__name__}, not a map")
    unknown = sorted(str(k) for k in value if k not in schema)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    missing = [k for k in schema if k not in value]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    for key, types in schema.items():
        got = value[key]
        # bool is an int to Python, never a number here.
        if isinstance(got, bool) or not isinstance(got, types):
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise ConfigError(f"{where}.{key} is {got!r}, not {want}")
    return value


def _one_of(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where} is {value!r}, not one of {', '.join(allowed)}")
    return value


def config_from_wire(body: Any) -> WorkerConfig:
    """The hello's map back into a `WorkerConfig`; ConfigError names the first bad field."""
    raw = _check_map(body, _FIELDS, "config")
    limits_raw = _check_map(raw["http_limits"], _LIMIT_TYPES, "config.http_limits")
    limits: dict[str, Any] = {}
    for name, types in _LIMIT_TYPES.items():
        number = limits_raw[name]
        if number < 0 or (isinstance(number, float) and math.isnan(number)):
            raise ConfigError(f"config.http_limits.{name} is {number!r}, not a number >= 0")
        limits[name] = float(number) if float in types else number
    if not raw["node"]:
        raise ConfigError("config.node is empty")
    sample_rate = float(raw["sample_rate"])
    if not 0.0 <= sample_rate <= 1.0:
        raise ConfigError(f"config.sample_rate is {sample_rate!r}, not within 0..1")
    report_interval = float(raw["report_interval"])
    if not report_interval > 0:
        raise ConfigError(f"config.report_interval is {report_interval!r}, not > 0")
    policy = _one_of(raw["outbound_policy"], get_args(OutboundPolicy), "config.outbound_policy")
    destination_l7 = _one_of(raw["destination_l7"], DESTINATION_L7_MODES, "config.destination_l7")
    return WorkerConfig(
        node=raw["node"],
        trust_domain=raw["trust_domain"],
        outbound_policy=policy,  # type: ignore[arg-type]  # checked against the Literal
        destination_l7=destination_l7,  # type: ignore[arg-type]  # checked against the Literal
        http_limits=Limits(**limits),
        zipkin_url=raw["zipkin_url"],
        sample_rate=sample_rate,
        log_level=_one_of(raw["log_level"], LOG_LEVELS, "config.log_level"),
        log_format=_one_of(raw["log_format"], LOG_FORMATS, "config.log_format"),
        report_interval=report_interval,
    )
