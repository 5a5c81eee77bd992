"""CniServer over a real unix socket: replies, error mapping, socket file life cycle."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from cni_fakes import RecordingHandler

from nodeagent.cni.errors import EnrollError
from nodeagent.cni.protocol import (
    NEED_DATA,
    CniReply,
    CniRequest,
    Command,
    FrameDecoder,
    PodRef,
    encode_frame,
)
from nodeagent.cni.server import CniServer

REQ = CniRequest(Command.ADD, "ctr", "/var/run/netns/p", "eth0", PodRef("ns", "web", "uid-1"))


async def exchange(path: str, data: bytes, *, half_close: bool = False) -> CniReply | None:
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(data)
        if half_close:
            await stream.send_eof()
        decoder = FrameDecoder()
        with trio.fail_after(10):
            while True:
                ev = decoder.next_event()
                if isinstance(ev, dict):
                    return CniReply.from_message(ev)
                if ev is not NEED_DATA:
                    return None
                decoder.receive_data(await stream.receive_some(65536))


async def call(server: CniServer, req: CniRequest = REQ) -> CniReply:
    reply = await exchange(server.socket_path, encode_frame(req.to_message()))
    assert reply is not None
    return reply


async def test_add_ok_and_skipped(server: CniServer, handler: RecordingHandler) -> None:
    assert await call(server) == CniReply.success()
    handler.enroll = False
    assert await call(server) == CniReply.success(skipped=True)
    assert [name for name, _ in handler.calls] == ["add", "add"]
    assert handler.calls[0][1] == REQ


@pytest.mark.parametrize(
    ("command", "method"),
    [(Command.DEL, "delete"), (Command.CHECK, "check"), (Command.STATUS, "status")],
)
async def test_dispatch(
    server: CniServer, handler: RecordingHandler, command: Command, method: str
) -> None:
    req = CniRequest(command, "ctr", "", "eth0", REQ.pod)
    assert (await call(server, req)).ok
    assert handler.calls[0][0] == method


async def test_gc_forwards_valid_attachments(server: CniServer, handler: RecordingHandler) -> None:
    valid = [{"containerID": "a", "ifname": "eth0"}]
    req = CniRequest(Command.GC, "", "", "", PodRef("", "", ""), valid_attachments=valid)
    assert (await call(server, req)).ok
    assert handler.calls == [("gc", valid)]


async def test_enroll_error_becomes_reply(server: CniServer, handler: RecordingHandler) -> None:
    handler.errors["add"] = EnrollError(100, "bind 15001 in netns p: address in use", "more")
    assert await call(server) == CniReply.failure(
        100, "bind 15001 in netns p: address in use", "more"
    )


async def test_handler_bug_is_999_and_server_survives(
    server: CniServer, handler: RecordingHandler
) -> None:
    handler.errors["add"] = ZeroDivisionError("division by zero")
    reply = await call(server)
    assert reply.code == 999
    assert "ZeroDivisionError" in reply.msg
    assert "ns/web" in reply.msg
    del handler.errors["add"]
    assert (await call(server)).ok


@pytest.mark.parametrize(
    ("data", "code", "match"),
    [
        (encode_frame({"v": 2, "cmd": "ADD"}), 1, "version 2"),
        (encode_frame({"v": 1, "cmd": "NOPE"}), 6, "unknown command"),
        (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", 6, "undecodable"),
        (struct.pack(">I", 10 << 20), 6, "exceeds"),
    ],
)
async def test_malformed_requests_get_error_replies(
    server: CniServer, handler: RecordingHandler, data: bytes, code: int, match: str
) -> None:
    reply = await exchange(server.socket_path, data)
    assert reply is not None
    assert not reply.ok
    assert reply.code == code
    assert match in reply.msg
    assert handler.calls == []
    assert (await call(server)).ok


async def test_truncated_request_then_eof(server: CniServer) -> None:
    reply = await exchange(server.socket_path, encode_frame(REQ.to_message())[:-3], half_close=True)
    assert reply is not None
    assert "closed after" in reply.msg


async def test_client_that_sends_nothing_and_closes(server: CniServer) -> None:
    stream = await trio.open_unix_socket(server.socket_path)
    await stream.aclose()
    assert (await call(server)).ok


async def test_slow_handler_times_out_with_code_11(
    sock_dir: Path, handler: RecordingHandler, nursery: trio.Nursery
) -> None:
    srv = CniServer(sock_dir / "cni.sock", handler, timeout=0.2)
    await nursery.start(srv.run)
    handler.block.add("add")
    reply = await call(srv)
    assert reply.code == 11
    assert "within 0.2s" in reply.msg
    assert "ns/web" in reply.details


async def test_socket_file_mode_and_removal(sock_dir: Path, handler: RecordingHandler) -> None:
    path = sock_dir / "sub" / "cni.sock"
    async with trio.open_nursery() as nursery:
        srv = CniServer(path, handler)
        await nursery.start(srv.run)
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert sorted(os.listdir(path.parent)) == ["cni.sock"]
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_stale_socket_replaced(sock_dir: Path, handler: RecordingHandler) -> None:
    path = sock_dir / "cni.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # file stays, nobody listens
    async with trio.open_nursery() as nursery:
        srv = CniServer(path, handler)
        await nursery.start(srv.run)
        assert (await call(srv)).ok
        nursery.cancel_scope.cancel()


async def test_live_socket_not_stolen(server: CniServer, handler: RecordingHandler) -> None:
    second = CniServer(server.socket_path, handler)
    with pytest.raises(OSError, match="another process is serving"):
        await second.run()
    assert (await call(server)).ok


async def test_non_socket_path_refused(sock_dir: Path, handler: RecordingHandler) -> None:
    path = sock_dir / "cni.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        await CniServer(path, handler).run()
    assert path.read_text() == "not a socket"


async def test_concurrent_requests(server: CniServer, handler: RecordingHandler) -> None:
    results: list[Any] = []

    async def one() -> None:
        results.append(await call(server))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert all(r.ok for r in results)
    assert len(results) == 20
    assert server.statistics().replies["ok"] == 20


def test_raw_msgpack_request_from_another_implementation() -> None:
    # What the plugin sends, built by hand: camelCase keys, None prevResult.
    msg = msgpack.unpackb(
        msgpack.packb(
            {
                "v": 1,
                "cmd": "DEL",
                "containerId": "c",
                "netns": "",
                "ifname": "eth0",
                "pod": {"namespace": "a", "name": "b", "uid": ""},
                "args": {},
                "prevResult": None,
                "config": {"type": "mesh-cni"},
                "validAttachments": [],
            }
        )
    )
    req = CniRequest.from_message(msg)
    assert req.command is Command.DEL
    assert req.prev_result is None
