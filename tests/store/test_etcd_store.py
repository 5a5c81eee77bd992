"""The etcd backend beyond the contract: failover, bad servers, TLS with client certs, auth."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from certs_helpers import write_pki
from etcd_procs import EtcdCluster, free_port, start_cluster

from nodeagent.store import StoreError, StoreUnavailable, open_store

pytestmark = pytest.mark.etcd


async def test_fails_over_from_dead_endpoints(etcd_server: EtcdCluster, ns: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    store = await open_store(f"etcd://{dead},{etcd_server.members[0].endpoint}")
    try:
        rev = await store.put(ns + "k", b"v")
        kv = await store.get(ns + "k")
        assert kv is not None
        assert kv.mod_revision == rev
    finally:
        await store.aclose()


async def test_no_endpoint_is_unavailable_quickly() -> None:
    store = await open_store(f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}?timeout=0.5")
    try:
        with trio.fail_after(15), pytest.raises(StoreUnavailable, match="no endpoint answered"):
            await store.get("/k")
    finally:
        await store.aclose()


async def fake_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]], nursery: trio.Nursery
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def answer(stream: trio.SocketStream, response: bytes) -> None:
    with trio.move_on_after(5):
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
        await stream.send_all(response)
    await stream.aclose()


@pytest.mark.parametrize(
    ("response", "problem"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "malformed JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "expected a JSON object"),
        (
            b'HTTP/1.1 200 OK\r\nContent-Length: 29\r\n\r\n{"kvs":[{"key":"!!notb64"}]}\n',
            "not valid base64",
        ),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad HTTP"),
    ],
)
async def test_malformed_responses_name_the_endpoint(response: bytes, problem: str) -> None:
    async with trio.open_nursery() as nursery:
        port = await fake_server(lambda s: answer(s, response), nursery)
        store = await open_store(f"etcd://127.0.0.1:{port}?timeout=2")
        try:
            with pytest.raises(StoreError) as info:
                await store.get("/k")
            assert f"127.0.0.1:{port}" in str(info.value)
            assert problem in str(info.value)
        finally:
            await store.aclose()
        nursery.cancel_scope.cancel()


async def test_server_errors_are_reported(etcd_server: EtcdCluster, ns: str) -> None:
    store = await open_store(etcd_server.url)
    try:
        rev = await store.put(ns + "k", b"")
        with pytest.raises(StoreError, match="compact"):
            await store.compact(rev + 1000)
    finally:
        await store.aclose()


# -- TLS with client certificates ------------------------------------------------------------


async def test_tls_with_client_certificates(tmp_path: Path, ns: str) -> None:
    pki = write_pki(tmp_path)
    cluster = start_cluster(
        1,
        scheme="https",
        extra=[
            "--cert-file", pki["server"],
            "--key-file", pki["server-key"],
            "--client-cert-auth",
            "--trusted-ca-file", pki["ca"],
        ],
    )  # fmt: skip
    try:
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(pki["client"], pki["client-key"])
        await trio.to_thread.run_sync(cluster.wait_ready, ctx)
        base = cluster.url
        good = f"{base}?cacert={pki['ca']}&cert={pki['client']}&key={pki['client-key']}"
        store = await open_store(good)
        try:
            rev = await store.put(ns + "tls", b"secret")
            kv = await store.get(ns + "tls")
            assert kv is not None
            assert (kv.value, kv.mod_revision) == (b"secret", rev)
            assert store.url.startswith("etcd://")
        finally:
            await store.aclose()
        # no client certificate: the server refuses the handshake
        anonymous = await open_store(f"{base}?cacert={pki['ca']}&timeout=0.3")
        try:
            with pytest.raises(StoreError):
                await anonymous.get(ns + "tls")
        finally:
            await anonymous.aclose()
        # a server we do not trust: refused on our side
        stranger = write_pki(tmp_path / "other")
        untrusted = await open_store(f"{base}?cacert={stranger['ca']}&timeout=0.3")
        try:
            with pytest.raises(StoreUnavailable, match="TLS handshake"):
                await untrusted.get(ns + "tls")
        finally:
            await untrusted.aclose()
    finally:
        cluster.stop()


# -- auth -------------------------------------------------------------------------------------


async def test_auth_token_and_reauthentication(ns: str) -> None:
    # simple tokens expire after --auth-token-ttl seconds: the client must re-authenticate
    cluster = start_cluster(1, extra=["--auth-token-ttl", "1"])
    try:
        await trio.to_thread.run_sync(cluster.wait_ready)
        admin = await open_store(cluster.url)
        assert hasattr(admin, "_call")
        for path, body in [
            ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/enable", {}),
        ]:
            await admin._call(path, body, idempotent=True)
        await admin.aclose()

        store = await open_store(f"{cluster.url}?user=root&password=rootpw")
        try:
            rev = await store.put(ns + "a", b"1")
            await trio.sleep(2.5)  # real time: let the server expire the token
            kv = await store.get(ns + "a")
            assert kv is not None
            assert kv.mod_revision == rev
            async with store.watch(ns, start_revision=rev) as events:
                async for batch in events:
                    assert batch[0].kv.key == ns + "a"
                    break
        finally:
            await store.aclose()

        wrong = await open_store(f"{cluster.url}?user=root&password=nope")
        try:
            with pytest.raises(StoreError, match="authenticat") as info:
                await wrong.get(ns + "a")
            assert "nope" not in str(info.value)
        finally:
            await wrong.aclose()
        anonymous = await open_store(cluster.url)
        try:
            with pytest.raises(StoreError, match=r"user name is empty|permission denied"):
                await anonymous.get(ns + "a")
        finally:
            await anonymous.aclose()
    finally:
        cluster.stop()


async def test_range_pages_at_one_revision(
    etcd_server: EtcdCluster, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("nodeagent.store.etcd.RANGE_PAGE", 3)
    store = await open_store(etcd_server.url)
    try:
        for i in range(10):
            await store.put(ns + f"p/{i}", b"%d" % i)
        kvs, rev = await store.range(ns + "p/")
        assert [kv.key for kv in kvs] == [ns + f"p/{i}" for i in range(10)]
        assert rev >= kvs[-1].mod_revision
    finally:
        await store.aclose()


class CuttableProxy:
    """A loopback TCP relay to etcd whose connections the test can cut at will."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.scopes: list[trio.CancelScope] = []
        self.port = 0

    async def handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self.scopes.append(scope)
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with client, upstream, trio.open_nursery() as n:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    while data := await src.receive_some(65536):
                        await dst.send_all(data)
                    scope.cancel()

                n.start_soon(pump, client, upstream)
                n.start_soon(pump, upstream, client)

    def cut(self) -> None:
        for scope in self.scopes:
            scope.cancel()
        self.scopes.clear()


async def test_watch_resumes_after_cut_without_loss_or_repeat(
    etcd_server: EtcdCluster, ns: str
) -> None:
    proxy = CuttableProxy(etcd_server.members[0].client_port)
    direct = await open_store(etcd_server.url)
    seen: list[bytes] = []
    last = 60
    live = {i: trio.Event() for i in range(15, last + 1, 15)}

    async def writer() -> None:
        for i in range(1, last + 1):
            await direct.put(ns + "w", b"%d" % i)
            if i % 15 == 0:
                await live[i].wait()  # the stream is live again: cut it mid-stream
                proxy.cut()  # the next writes land while the watch reconnects

    try:
        async with trio.open_nursery() as nursery:
            proxy.port = await fake_server(proxy.handle, nursery)
            watched = await open_store(f"etcd://127.0.0.1:{proxy.port}")
            try:
                start = await direct.put(ns + "w", b"0")
                with trio.fail_after(20):
                    async with watched.watch(ns, start_revision=start) as events:
                        nursery.start_soon(writer)
                        async for batch in events:
                            seen.extend(e.kv.value for e in batch)
                            for at, event in live.items():
                                if len(seen) >= at - 5:
                                    event.set()
                            if seen[-1] == b"%d" % last:
                                break
            finally:
                await watched.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await direct.aclose()
    assert seen == [b"%d" % i for i in range(last + 1)]
