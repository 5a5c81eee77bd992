"""Request smuggling: the corpus (smuggling_corpus.json) against the downstream codec (the
framing checks and h11, sans-IO, whole and byte by byte) and through an in-memory HttpProxy
whose backend records every request it receives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from http_helpers import Backend, app_snapshot, first_endpoint_registry, memory_connector

from nodeagent.http import HttpProxy, RequestLog
from nodeagent.http.framing import FramingError, RequestFraming
from nodeagent.routing import Source

CORPUS: dict[str, Any] = json.loads((Path(__file__).parent / "smuggling_corpus.json").read_text())
ATTACKS = CORPUS["attacks"]
CONTROLS = CORPUS["controls"]
SMUGGLED = CORPUS["smuggled_path"]


def _raw(case: dict[str, Any]) -> bytes:
    return str(case["request"]).encode("latin-1")


def _codec(data: bytes, step: int) -> tuple[int | None, list[str]]:
    """Feed `data` `step` bytes at a time through the framing checks, then h11 (as
    `Downstream` does). Returns the error status (None: no error) and the request targets."""
    framing = RequestFraming(max_head_bytes=60 * 1024)
    conn = h11.Connection(h11.SERVER)
    targets: list[str] = []

    def drain() -> Iterator[None]:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                targets.append(event.target.decode())
            if isinstance(event, h11.EndOfMessage):
                # Answer it, so h11 moves on to the next request as the proxy does.
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
            yield

    try:
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            framing.feed(piece)
            conn.receive_data(piece)
            for _ in drain():
                pass
    except h11.RemoteProtocolError as exc:
        return exc.error_status_hint, targets
    return None, targets


@pytest.mark.parametrize("case", ATTACKS, ids=[c["name"] for c in ATTACKS])
@pytest.mark.parametrize("step", [1 << 20, 7, 1])
def test_codec_refuses_every_attack_before_the_smuggled_request(
    case: dict[str, Any], step: int
) -> None:
    status, targets = _codec(_raw(case), step)
    assert status == case["status"], (case["why"], targets)
    assert SMUGGLED not in targets


@pytest.mark.parametrize("case", CONTROLS, ids=[c["name"] for c in CONTROLS])
@pytest.mark.parametrize("step", [1 << 20, 3, 1])
def test_codec_passes_well_framed_requests(case: dict[str, Any], step: int) -> None:
    status, targets = _codec(_raw(case), step)
    assert status is None
    assert targets == case["paths"]


def test_framing_errors_name_the_problem() -> None:
    framing = RequestFraming(max_head_bytes=1024)
    with pytest.raises(FramingError, match="both Transfer-Encoding and Content-Length"):
        framing.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(FramingError, match="request head too large"):
        RequestFraming(max_head_bytes=64).feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 100)


async def _through_proxy(data: bytes) -> tuple[bytes, Backend, list[RequestLog]]:
    """Send `data` in one write to an HttpProxy; everything the client got until the proxy
    closed, the backend (its `seen` requests) and the proxy's request logs."""
    backend = Backend("v1")
    logs: list[RequestLog] = []
    async with trio.open_nursery() as nursery:
        proxy = HttpProxy(
            snapshot=app_snapshot,
            source=Source(namespace="default", labels={"app": "client"}),
            connector=memory_connector(nursery, {"10.0.0.1": backend}),
            registry=first_endpoint_registry(),
            on_request=logs.append,
        )
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(
            partial(proxy.serve, server, port=80, host="app.default.svc.cluster.local")
        )
        await client.send_all(data)
        received = b""
        with trio.fail_after(5):  # the proxy must close: a hang fails here
            while chunk := await client.receive_some(65536):
                received += chunk
        nursery.cancel_scope.cancel()
    return received, backend, logs


@pytest.mark.parametrize("case", ATTACKS, ids=[c["name"] for c in ATTACKS])
async def test_proxy_answers_and_closes_and_forwards_nothing(case: dict[str, Any]) -> None:
    received, backend, logs = await _through_proxy(_raw(case))
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(f"http/1.1 {case['status']} ".encode()), received[:200]
    assert b"connection: close" in head
    assert received.count(b"HTTP/1.1 ") == 1  # one answer, then the close
    assert [s.target for s in backend.seen] == []  # nothing forwarded, smuggled or not
    assert [e.code for e in logs] == [case["status"]]
    assert logs[0].response_flags == "DPE"


@pytest.mark.parametrize("case", CONTROLS, ids=[c["name"] for c in CONTROLS])
async def test_proxy_serves_well_framed_pipelined_requests(case: dict[str, Any]) -> None:
    data = _raw(case).replace(b"Host: app\r\n\r\n", b"Host: app\r\nConnection: close\r\n\r\n")
    received, backend, logs = await _through_proxy(data)
    assert [s.target for s in backend.seen] == case["paths"]
    assert received.count(b"HTTP/1.1 200 ") == len(case["paths"])
    assert [e.code for e in logs] == [200] * len(case["paths"])
