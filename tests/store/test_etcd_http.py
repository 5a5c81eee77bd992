"""The etcd side of HTTP: JSON POSTs on a real loopback connection, and the gateway's readers."""

from __future__ import annotations

import json
from functools import partial

import h11
import pytest
import trio

from nodeagent.store.base import StoreError
from nodeagent.store.etcd import _Parse, range_end
from nodeagent.store.etcd_http import HttpConnection, NotSent


async def test_send_request_posts_json(nursery: trio.Nursery) -> None:
    seen: list[h11.Request | bytes] = []

    async def server(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 16))
            elif isinstance(ev, h11.Request | h11.Data):
                seen.append(ev if isinstance(ev, h11.Request) else bytes(ev.data))
        out = b'{"header":{"revision":"3"}}'
        for ev in (
            h11.Response(status_code=200, headers=[("Content-Length", str(len(out)))]),
            h11.Data(data=out),
            h11.EndOfMessage(),
        ):
            await stream.send_all(conn.send(ev) or b"")

    listeners = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    conn = await HttpConnection.connect("127.0.0.1", port, f"127.0.0.1:{port}", None)
    try:
        body = json.dumps({"key": "YQ=="}).encode()
        await conn.send_request("/v3/kv/range", body, [("Authorization", "tok")])
        assert await conn.read_head() == 200
        assert json.loads(await conn.read_body()) == {"header": {"revision": "3"}}
        assert conn.reusable()
    finally:
        await conn.aclose()
    req, sent = seen
    assert isinstance(req, h11.Request)
    assert (req.method, req.target) == (b"POST", b"/v3/kv/range")
    headers = dict(req.headers)
    assert headers[b"host"] == f"127.0.0.1:{port}".encode()
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"authorization"] == b"tok"
    assert sent == body


async def test_connect_failure_is_not_sent() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NotSent, match=r"^connect: .*Connection refused"):
        await HttpConnection.connect("127.0.0.1", port, "h", None)


def test_parse_rejects_bad_fields() -> None:
    p = _Parse("etcd http://h:1/v3/kv/range")
    with pytest.raises(StoreError, match=r"h:1.*not valid base64"):
        p.kv({"key": "***"})
    with pytest.raises(StoreError, match="not an integer"):
        p.kv({"key": "YQ==", "mod_revision": "x"})
    with pytest.raises(StoreError, match="not a list"):
        p.objects({"kvs": "no"}, "kvs")
    with pytest.raises(StoreError, match=r"header\.revision"):
        p.revision({})
    kv = p.kv({"key": "YQ==", "value": "Yg==", "mod_revision": "7", "create_revision": 3})
    assert (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version) == (
        "a",
        b"b",
        7,
        3,
        0,
    )


def test_range_end() -> None:
    assert range_end("/a/") == b"/a0"
    assert range_end("") == b"\0"
    assert range_end("a\xff") == "a\xff".encode()[:-1] + b"\xc0"
