"""How long a client tunnel may carry new requests: `TunnelCredentials`.

A TLS connection is authenticated once, at its handshake; a pooled connection would go on
carrying requests after either certificate expired, after our certificate rotated, or after the
peer's was revoked. The HTTP pool asks `problem()` before each reuse and closes the connection
when it answers. Checks, from cheap to costly:

- the peer certificate's notAfter (parsed from its DER once, on the first check);
- the local side: the provider's current client context for the source identity must be the
  one the handshake used. `client_context` raises IdentityUnavailable once our certificate has
  expired (IdentityManager), and returns a new context after a rotation or a new trust bundle,
  so one identity comparison bounds the connection by our own notAfter and closes it on rotation;
- revocation of the peer (the CRL changes without a new context): `peer_identity(der)` again,
  at most once per `REVOCATION_RECHECK` seconds per connection, as it parses the certificate.
"""

from __future__ import annotations

import ssl
import time

import trio
from cryptography import x509

from nodeagent.identity.api import IdentityProvider, IdentityUnavailable, PeerRejected

# A revoked peer's pooled connections stop carrying requests within this many seconds.
REVOCATION_RECHECK = 1.0


class TunnelCredentials:
    """The certificates a client tunnel was opened with, and whether they still hold."""

    def __init__(
        self,
        identities: IdentityProvider,
        source_identity: str,
        context: ssl.SSLContext,
        peer_der: bytes,
    ) -> None:
        self.identities = identities
        self.source_identity = source_identity
        self.context = context
        self.peer_der = peer_der
        self._peer_expires_at: float | None = None  # trio time, from the peer's notAfter
        self._checked_at = trio.current_time()  # peer_identity ran in the handshake

    def problem(self) -> str | None:
        """Why this tunnel may not carry another request, or None while it may."""
        now = trio.current_time()
        if self._peer_expires_at is None:
            not_after = x509.load_der_x509_certificate(self.peer_der).not_valid_after_utc
            # notAfter is wall time; the pool runs on trio's clock (a MockClock in tests).
            self._peer_expires_at = now + (not_after.timestamp() - time.time())
        if now >= self._peer_expires_at:
            return "the peer's certificate expired"
        try:
            current = self.identities.client_context(self.source_identity)
        except IdentityUnavailable as exc:
            return f"the local certificate is no longer usable ({exc})"
        if current is not self.context:
            return "the local certificate or the trust bundle changed"
        if now - self._checked_at >= REVOCATION_RECHECK:
            self._checked_at = now
            try:
                self.identities.peer_identity(self.peer_der)
            except PeerRejected as exc:
                return f"the peer is no longer trusted ({exc})"
        return None
