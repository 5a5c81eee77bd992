"""TunnelCredentials over a real TLS 1.3 handshake with short-lived certificates: a client tunnel
stops qualifying for reuse at the peer's notAfter, at our own rotation, and at the peer's
revocation. Trio's MockClock stands for the passing of time (no sleeps)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from pki import LocalIdentityProvider, ThrowawayCA, spiffe
from test_tunnel_tls import connected

from nodeagent.tunnel import TlsStream
from nodeagent.tunnel.credentials import REVOCATION_RECHECK, TunnelCredentials

A, B = spiffe("a", "client"), spiffe("b", "server")


@pytest.fixture
def ids() -> Iterator[LocalIdentityProvider]:
    provider = LocalIdentityProvider(ThrowawayCA())
    provider.ensure(A)
    provider.ttl = 30.0  # the server's certificate is short-lived, the client's is not
    provider.ensure(B)
    yield provider
    provider.close()


async def _client(ids: LocalIdentityProvider) -> tuple[TlsStream, TunnelCredentials]:
    client, server = await connected(ids)
    await server.aclose()
    # as open_tunnel does once the handshake verified the server
    creds = TunnelCredentials(ids, A, ids.client_context(A), client.peer_certificate())
    return client, creds


async def test_the_peer_certificate_bounds_the_tunnel(
    ids: LocalIdentityProvider, mock_clock: trio.testing.MockClock
) -> None:
    client, creds = await _client(ids)
    assert creds.problem() is None
    mock_clock.jump(20)
    assert creds.problem() is None
    mock_clock.jump(15)  # past the server certificate's 30 s notAfter
    assert creds.problem() == "the peer's certificate expired"
    await client.aclose()


async def test_local_rotation_retires_the_tunnel(
    ids: LocalIdentityProvider, mock_clock: trio.testing.MockClock
) -> None:
    client, creds = await _client(ids)
    ids.release(A)
    ids.ensure(A)  # a new certificate, so a new client context
    assert creds.problem() == "the local certificate or the trust bundle changed"
    ids.release(A)  # no certificate at all
    problem = creds.problem()
    assert problem is not None
    assert problem.startswith("the local certificate is no longer usable")
    await client.aclose()


async def test_peer_revocation_retires_the_tunnel_within_the_recheck_period(
    ids: LocalIdentityProvider, mock_clock: trio.testing.MockClock
) -> None:
    client, creds = await _client(ids)
    ids.revoke(B)
    mock_clock.jump(REVOCATION_RECHECK)
    problem = creds.problem()
    assert problem is not None
    assert "is revoked" in problem
    await client.aclose()
