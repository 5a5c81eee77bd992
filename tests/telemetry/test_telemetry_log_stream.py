"""The agent's one log stream: structured log events and access-log batches written concurrently
(real threads and a real trio task, thousands of lines) come out as whole lines, one JSON object
each: no line holds two records, no line is empty."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from nodeagent import log
from nodeagent.telemetry.accesslog import AccessLog, AccessRecord

THREADS = 4
EVENTS_PER_THREAD = 3000
ACCESS_RECORDS = 12000


def _record(i: int) -> AccessRecord:
    return AccessRecord(
        kind="request",
        namespace="shop",
        start_time=1_700_000_000.0 + i,
        duration_ms=1.5,
        path=f"/item/{i}",
        response_code=200,
    )


async def test_structlog_and_access_log_share_one_stream_of_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unbuffered text stream on a real file, as the agent's stderr is under the sandbox and
    # the DaemonSet (PYTHONUNBUFFERED=1): every write call reaches the file as it is made.
    path = tmp_path / "agent.log"
    raw = path.open("wb", buffering=0)
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stderr", stream)
    log.configure("info", "json")
    access = AccessLog(max_queue=ACCESS_RECORDS)  # room for all: every record is written
    logger = log.get_logger("test.stream")
    start = threading.Barrier(THREADS + 1)

    def emit(thread: int) -> None:
        start.wait()
        for i in range(EVENTS_PER_THREAD):
            logger.info("stream.event", thread=thread, i=i, pad="x" * (i % 50))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(access.run)
            threads = [threading.Thread(target=emit, args=(t,)) for t in range(THREADS)]
            for t in threads:
                t.start()
            await trio.to_thread.run_sync(start.wait)
            for i in range(ACCESS_RECORDS):
                access.log(_record(i))
                if i % 64 == 0:
                    await trio.lowlevel.checkpoint()  # let the writer batch meanwhile
            for t in threads:
                await trio.to_thread.run_sync(t.join)
            with trio.fail_after(30):
                while access.written < ACCESS_RECORDS:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # the writer's batches are on a worker thread
            nursery.cancel_scope.cancel()
    finally:
        stream.close()
        log.configure("info", "json")
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    bad = []
    events = access_lines = 0
    for n, line in enumerate(text.split("\n")[:-1], 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {n}: {exc}: {line[:160]!r}")
            continue
        if not isinstance(obj, dict):
            bad.append(f"line {n}: not an object: {line[:160]!r}")
        elif obj.get("event") == "stream.event":
            events += 1
        elif obj.get("event") == "access.request":
            access_lines += 1
    assert not bad, f"{len(bad)} broken lines, e.g.:\n" + "\n".join(bad[:5])
    assert events == THREADS * EVENTS_PER_THREAD
    assert access_lines == access.written == ACCESS_RECORDS
