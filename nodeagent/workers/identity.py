"""`WorkerIdentities`: the data plane's `IdentityProvider` inside a worker process.

The control process's `IdentityManager` obtains and renews the certificates; it sends its
`material()` (bundle, revoked serials, each servable identity's key and chain) to every worker
whenever it changes, and the worker swaps it in here (`update`). TLS contexts are built on first
use and cached per identity until the next material with a different chain or bundle, exactly
like the manager's; `wait_changed` wakes the inbound path's revocation re-check.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509

from nodeagent.ca import certs
from nodeagent.identity import mtls
from nodeagent.identity.api import IdentityUnavailable


@dataclass(slots=True)
class _Held:
    chain_pem: str
    key_pem: str
    not_after: float
    serial: str  # the leaf's, as the admin socket shows it
    server_ctx: ssl.SSLContext | None = None
    client_ctx: ssl.SSLContext | None = None


class WorkerIdentities:
    def __init__(self, trust_domain: str, *, clock: Callable[[], float] = time.time) -> None:
        self.trust_domain = trust_domain
        self._clock = clock
        self._bundle = ""
        self._revoked: frozenset[int] = frozenset()
        self._held: dict[str, _Held] = {}
        self._changed = trio.Event()
        self.updates = 0

    def update(self, material: dict[str, Any]) -> None:
        """Swap in the control's `IdentityManager.material()`; raises ValueError when malformed
        (the previous material stays)."""
        bundle = str(material["bundle"])
        revoked = frozenset(int(str(s), 16) for s in material["revoked"])
        held: dict[str, _Held] = {}
        for identity, m in dict(material["identities"]).items():
            chain_pem, key_pem = str(m["chain"]), str(m["key"])
            old = self._held.get(identity)
            if old is not None and old.chain_pem == chain_pem and bundle == self._bundle:
                held[identity] = old  # same certificate and bundle: keep the cached contexts
                continue
            try:
                leaf = x509.load_pem_x509_certificate(chain_pem.encode())
            except ValueError as exc:
                raise ValueError(f"identity {identity}: chain: {exc}") from None
            held[identity] = _Held(
                chain_pem, key_pem, certs.not_after(leaf), certs.serial_hex(leaf.serial_number)
            )
        self._bundle, self._revoked, self._held = bundle, revoked, held
        self.updates += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    # -- IdentityProvider -----------------------------------------------------------------------

    def ensure(self, identity: str) -> None:
        """The control process ensures identities; a worker only serves what it is sent."""

    def release(self, identity: str) -> None:
        """See `ensure`."""

    def _unavailable(self, identity: str) -> str | None:
        h = self._held.get(identity)
        if h is None:
            return "no certificate from the control process yet"
        if self._clock() >= h.not_after:
            return "the certificate expired"
        if not self._bundle:
            return "no trust bundle yet"
        return None

    def _ready(self, identity: str) -> _Held:
        why = self._unavailable(identity)
        if why is not None:
            raise IdentityUnavailable(f"{identity}: {why}")
        return self._held[identity]

    async def wait_ready(self, identity: str, within: float) -> None:
        with trio.move_on_after(within):
            while self._unavailable(identity) is not None:
                await self._changed.wait()
            return
        raise IdentityUnavailable(
            f"{identity}: no valid certificate after {within}s ({self._unavailable(identity)})"
        )

    def server_context(self, identity: str) -> ssl.SSLContext:
        h = self._ready(identity)
        if h.server_ctx is None:
            h.server_ctx = self._context(h, server=True)
        return h.server_ctx

    def client_context(self, identity: str) -> ssl.SSLContext:
        h = self._ready(identity)
        if h.client_ctx is None:
            h.client_ctx = self._context(h, server=False)
        return h.client_ctx

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def peer_identity(self, cert_der: bytes) -> str:
        return mtls.peer_identity(cert_der, self.trust_domain, self._revoked)

    def statistics(self) -> dict[str, Any]:
        return {
            "identities": len(self._held),
            "revoked": len(self._revoked),
            "updates": self.updates,
            "serials": {i: h.serial for i, h in self._held.items()},
        }

    def _context(self, h: _Held, *, server: bool) -> ssl.SSLContext:
        return mtls.mtls_context(
            h.chain_pem.encode(), h.key_pem.encode(), self._bundle, server=server
        )
