"""The contract between the agent's identity manager and the data plane that uses it.

The data plane never sees keys or the store: it asks for a ready-made TLS context for a workload's
SPIFFE id, and for the verified SPIFFE id of a peer certificate. Contexts are cached by the
provider and replaced when a certificate rotates or the trust bundle changes, so callers fetch one
per connection (a dict lookup) and established connections keep the context they started with.
"""

from __future__ import annotations

import ssl
from typing import Protocol


class IdentityUnavailable(Exception):
    """No valid certificate for this SPIFFE id (yet): the caller must not fall back to plaintext."""


class PeerRejected(Exception):
    """A peer certificate that verified against the bundle but may not be trusted: it carries no
    single well-formed SPIFFE id of our trust domain, or it is revoked."""


class IdentityProvider(Protocol):
    def ensure(self, identity: str) -> None:
        """Start obtaining (and keep renewing) a certificate for `identity`; idempotent, never
        blocks. The agent calls it when a workload with that identity is enrolled."""

    def release(self, identity: str) -> None:
        """No workload on this node has `identity` any more: stop renewing and forget its key."""

    async def wait_ready(self, identity: str, within: float) -> None:
        """Return once `identity` has a valid certificate; IdentityUnavailable after `within` s."""

    def server_context(self, identity: str) -> ssl.SSLContext:
        """TLS 1.3 only, presents `identity`'s certificate, requires a client certificate and
        verifies its chain against the trust bundle. IdentityUnavailable if not ready."""

    def client_context(self, identity: str) -> ssl.SSLContext:
        """TLS 1.3 only, presents `identity`'s certificate and verifies the server's chain against
        the trust bundle, with hostname checks off: the caller compares `peer_identity()` to the
        SPIFFE id the destination workload must have. IdentityUnavailable if not ready."""

    async def wait_changed(self) -> None:
        """Return at the next change: a certificate issued or renewed, a failure, a new trust
        bundle or revocation list. The data plane re-checks open connections then."""

    def peer_identity(self, cert_der: bytes) -> str:
        """The SPIFFE id of a peer certificate that the handshake verified (from
        `getpeercert(binary_form=True)`). PeerRejected when it has no single SPIFFE URI SAN of our
        trust domain, or when its serial is on the revocation list."""
