"""Shared pieces of the identity tests: a CA, a signer on a memory store, workloads, TLS."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Any

import trio
from cryptography import x509
from snapshot_docs import key_of, workload

from nodeagent.ca import certs
from nodeagent.ca.signer import Signer
from nodeagent.store import codec
from nodeagent.store.base import Store

TD = "cluster.local"


def wall_clock() -> Callable[[], float]:
    """Wall time that moves with trio's clock (so autojump moves certificate time too)."""
    base = time.time() - trio.current_time()
    return lambda: base + trio.current_time()


def authority(td: str = TD) -> certs.SigningAuthority:
    key, root = certs.create_root(td, now=time.time() - 3600)
    return certs.SigningAuthority(key, root, (), (root,))


def spiffe(ns: str, sa: str, td: str = TD) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


async def add_workload(store: Store, node: str, uid: str, ns: str, sa: str) -> None:
    doc = workload(uid, "10.0.0.1", name=uid, namespace=ns, node=node, sa=sa)
    await store.put(key_of(doc), codec.encode(doc))


class RunningSigner:
    """A signer that a test can stop and start again (the CA going away and coming back)."""

    def __init__(self, nursery: trio.Nursery, signer: Signer) -> None:
        self.nursery = nursery
        self.signer = signer
        self.scope: trio.CancelScope | None = None

    async def start(self) -> None:
        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scope = scope
                await self.signer.run(task_status=task_status)

        await self.nursery.start(run)

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


def leaf_context(
    auth: certs.SigningAuthority, ident: str, cadata: str, *, server: bool
) -> ssl.SSLContext:
    """A TLS 1.3 context with a certificate signed directly by `auth` (not via the manager)."""
    import tempfile
    from pathlib import Path

    key = certs.new_key()
    sid = certs.parse_spiffe_id(ident)
    csr = certs.check_csr(certs.build_csr(key, sid), sid)
    cert = certs.sign_svid(auth, csr, sid, now=time.time(), ttl=3600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cadata)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.pem").write_bytes(certs.cert_pem([cert]))
        (Path(tmp) / "k.pem").write_bytes(certs.key_pem(key))
        ctx.load_cert_chain(Path(tmp) / "c.pem", Path(tmp) / "k.pem")
    return ctx


async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> dict[str, Any]:
    """A real TLS handshake over a socketpair; each side's view of its peer (DER), the TLS
    version, and a byte echoed through, or the exceptions each side saw."""
    a, b = trio.socket.socketpair()
    server = trio.SSLStream(trio.SocketStream(a), server_ctx, server_side=True)
    client = trio.SSLStream(trio.SocketStream(b), client_ctx, server_hostname=None)
    out: dict[str, Any] = {"errors": []}

    async def serve() -> None:
        try:
            await server.do_handshake()
            out["client_cert"] = server.getpeercert(binary_form=True)
            data = await server.receive_some(10)
            await server.send_all(data)
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            out["errors"].append(("server", exc))
        finally:
            await trio.aclose_forcefully(server)

    async def connect() -> None:
        try:
            await client.do_handshake()
            out["server_cert"] = client.getpeercert(binary_form=True)
            out["version"] = client.version()
            await client.send_all(b"x")
            out["echo"] = await client.receive_some(10)
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            out["errors"].append(("client", exc))
        finally:
            await trio.aclose_forcefully(client)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(connect)
    return out


def cert_of(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)
