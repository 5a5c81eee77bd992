"""Access logs: one structured line per proxied request and per TCP connection.

The data path calls `AccessLog.log(record)`, which only puts the record on a bounded in-memory
queue (and counts it as dropped when the queue is full); the `run()` task wakes at most every
`BATCH_WINDOW` seconds, renders what has queued up (JSON by default, with the fields in a fixed,
precomputed order; structlog's console format on request) and writes the batch from a worker
thread, so a slow or stuck stderr never stalls a request and a busy proxy pays one task wake-up
and one thread hand-off per batch, not per line. The batch goes through `nodeagent.log.STDERR`, the
process's one log writer, as whole lines. Logging is switchable per namespace (the
namespace of the workload whose proxy reports).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog
import trio

from nodeagent.log import STDERR
from nodeagent.telemetry.metrics import Counter, Metric

Format = Literal["json", "console"]
DEFAULT_QUEUE = 4096
MAX_BATCH = 256
# How long the writer lets lines accumulate after the first one: a line reaches stderr at most
# this late, and at high rates one wake-up + thread hand-off covers many lines.
BATCH_WINDOW = 0.02


class TextSink(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One request (kind "request") or one TCP connection (kind "connection").

    `namespace` selects the per-namespace switch; `bytes_received` is what the client sent (in),
    `bytes_sent` what it got back (out). Unknown strings are "-" as in Envoy's access log.
    """

    kind: Literal["request", "connection"]
    namespace: str
    start_time: float  # unix seconds
    duration_ms: float
    reporter: Literal["source", "destination"] = "source"
    protocol: str = "tcp"
    method: str = "-"
    authority: str = "-"
    path: str = "-"
    response_code: int = 0
    response_flags: str = "-"
    bytes_received: int = 0
    bytes_sent: int = 0
    upstream_host: str = "-"
    upstream_transport_failure_reason: str = "-"  # a failed TLS origination's reason
    downstream_address: str = "-"
    source_principal: str = "-"
    destination_principal: str = "-"
    request_principal: str = "-"  # <iss>/<sub> of a verified JWT (destination, gateway)
    response_code_details: str = "-"  # Envoy's: e.g. the RBAC policy that denied the request
    request_id: str = "-"
    trace_id: str = "-"
    connection_id: str = "-"

    def event(self) -> dict[str, Any]:
        # Field by field in declaration order (what `dataclasses.asdict` gave, without its
        # per-value deepcopy: every field is a str, int or float).
        event = {name: getattr(self, name) for name in _FIELD_NAMES}
        event["start_time"] = datetime.fromtimestamp(self.start_time, UTC).isoformat(
            timespec="milliseconds"
        )
        event["duration_ms"] = round(self.duration_ms, 3)
        return event


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(AccessRecord))


class AccessLog:
    def __init__(
        self,
        *,
        fmt: Format = "json",
        sink: TextSink | None = None,
        max_queue: int = DEFAULT_QUEUE,
        enabled: bool = True,
        namespaces: Mapping[str, bool] | None = None,
    ) -> None:
        if fmt not in ("json", "console"):
            raise ValueError(f"access log format {fmt!r}: one of json, console")
        self.fmt: Format = fmt
        self._renderer: Any = (
            structlog.processors.JSONRenderer(sort_keys=False)
            if fmt == "json"
            else structlog.dev.ConsoleRenderer(colors=False)
        )
        # The process's one log writer by default: a batch of whole lines never interleaves
        # with structlog's events.
        self._sink: TextSink = sink if sink is not None else STDERR
        self.default_enabled = enabled
        self.namespaces: dict[str, bool] = dict(namespaces or {})
        self._send, self._receive = trio.open_memory_channel[AccessRecord](max_queue)
        self.logged = 0
        self.dropped = 0
        self.written = 0
        self.write_errors = 0

    def set_namespace(self, namespace: str, enabled: bool | None) -> None:
        """Switch one namespace on or off; None returns it to the default."""
        if enabled is None:
            self.namespaces.pop(namespace, None)
        else:
            self.namespaces[namespace] = enabled

    def log(self, record: AccessRecord) -> None:
        """Queue one line; never blocks (a full queue drops the record and counts it)."""
        if not self.namespaces.get(record.namespace, self.default_enabled):
            return
        try:
            self._send.send_nowait(record)
            self.logged += 1
        except trio.WouldBlock:
            self.dropped += 1

    def render(self, record: AccessRecord) -> str:
        event = record.event()
        event["event"] = f"access.{record.kind}"
        event["component"] = "accesslog"
        event["timestamp"] = datetime.now(UTC).isoformat()
        if self.fmt == "json":
            # What structlog's JSONRenderer(sort_keys=False) writes, without its processor
            # plumbing; the values are plain str/int/float, so no fallback handler is needed.
            return json.dumps(event) + "\n"
        line: str = self._renderer(None, "info", event)
        return line + "\n"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            # Let the batch fill while the proxies work: the records stay on the bounded
            # channel meanwhile, so a full queue still drops (and counts) as before.
            await trio.sleep(BATCH_WINDOW)
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            text = "".join(self.render(r) for r in batch)
            try:
                await trio.to_thread.run_sync(self._write, text, abandon_on_cancel=True)
                self.written += len(batch)
            except OSError:
                self.write_errors += 1

    def _write(self, text: str) -> None:
        self._sink.write(text)
        self._sink.flush()

    def statistics(self) -> dict[str, int]:
        return {
            "logged": self.logged,
            "dropped": self.dropped,
            "written": self.written,
            "write_errors": self.write_errors,
            "queued": self._receive.statistics().current_buffer_used,
        }

    def collector(self) -> Iterable[Metric]:
        """MetricsRegistry collector: `registry.add_collector(access_log.collector)`."""
        dropped = Counter(
            "nodeagent_accesslog_dropped_total", "Access log lines dropped (queue full)."
        )
        dropped.values[()] = self.dropped
        return [dropped]
