"""The JWKS cache against a real JWKS server on loopback: first fetch, shared fetches, key
rotation found through an unknown kid (rate-limited), interval refresh, a failed fetch keeping
the last good keys, a server that never answers, HTTPS."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio
from certs_helpers import write_pki
from jwt_helpers import JwksServer, jwks, rule, signing_key, token, wait_until

from nodeagent.authn import Authenticator

K1, K2 = signing_key("k1"), signing_key("k2", "ES256")

MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"


def _bearer(t: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {t}")]


async def test_keys_are_fetched_once_and_shared(nursery: trio.Nursery) -> None:
    server = JwksServer(body=jwks([K1]))
    await nursery.start(server.run)
    authn = Authenticator()
    r = rule(jwks_uri=server.uri)
    results = []

    async def one() -> None:
        results.append(await authn.authenticate([r], "GET", "/", _bearer(token(K1))))

    async with trio.open_nursery() as inner:
        for _ in range(5):
            inner.start_soon(one)
    assert [x.status for x in results] == [200] * 5
    assert server.requests == 1
    again = await authn.authenticate([r], "GET", "/", _bearer(token(K1)))
    assert again.status == 200
    assert server.requests == 1


async def test_rotation_is_found_through_an_unknown_kid_at_most_once_per_interval(
    nursery: trio.Nursery,
) -> None:
    server = JwksServer(body=jwks([K1]))
    await nursery.start(server.run)
    authn = Authenticator(min_refetch_interval=0.5)
    r = rule(jwks_uri=server.uri)
    assert (await authn.authenticate([r], "GET", "/", _bearer(token(K1)))).status == 200
    server.body = jwks([K2])  # the issuer rotates: k1 retired, k2 signs
    await trio.sleep(0.5)
    rotated = await authn.authenticate([r], "GET", "/", _bearer(token(K2)))
    assert rotated.status == 200
    assert server.requests == 2
    # an unknown kid again right away: no new fetch, Envoy's answer
    stranger = token(signing_key("k3", "ES256"))
    result = await authn.authenticate([r], "GET", "/", _bearer(stranger))
    assert (result.status, result.body) == (401, MISMATCH)
    assert server.requests == 2
    retired = await authn.authenticate([r], "GET", "/", _bearer(token(K1)))
    assert retired.status == 401
    assert server.requests == 2


async def test_the_interval_refresh_picks_up_new_keys_and_a_failure_keeps_the_old(
    nursery: trio.Nursery,
) -> None:
    server = JwksServer(body=jwks([K1]))
    await nursery.start(server.run)
    authn = Authenticator(refresh_interval=0.2, min_refetch_interval=3600)
    await nursery.start(authn.run)
    r = rule(jwks_uri=server.uri)
    assert (await authn.authenticate([r], "GET", "/", _bearer(token(K1)))).status == 200
    server.body = jwks([K1, K2])
    await wait_until(lambda: authn.jwks.statistics()[server.uri]["keys"] == 2)
    assert (await authn.authenticate([r], "GET", "/", _bearer(token(K2)))).status == 200
    server.status = 500
    failures = authn.jwks.statistics()[server.uri]["failures"]
    await wait_until(lambda: authn.jwks.statistics()[server.uri]["failures"] > failures)
    assert authn.jwks.statistics()[server.uri]["last_error"] == f"{server.uri}: HTTP 500"
    for key in (K1, K2):
        assert (await authn.authenticate([r], "GET", "/", _bearer(token(key)))).status == 200
    server.status, server.body = 200, "not json"
    failures = authn.jwks.statistics()[server.uri]["failures"]
    await wait_until(lambda: authn.jwks.statistics()[server.uri]["failures"] > failures)
    assert (await authn.authenticate([r], "GET", "/", _bearer(token(K2)))).status == 200


async def test_a_server_that_does_not_answer_costs_at_most_the_rule_timeout(
    nursery: trio.Nursery,
) -> None:
    server = JwksServer(hang=True)
    await nursery.start(server.run)
    authn = Authenticator()
    r = rule(jwks_uri=server.uri, timeout=0.3)
    start = trio.current_time()
    result = await authn.authenticate([r], "GET", "/", _bearer(token(K1)))
    assert (result.status, result.body) == (401, "Jwks remote fetch is failed")
    assert trio.current_time() - start < 5  # bounded: the 0.3 s timeout, not forever
    assert "no answer within 0.3s" in str(authn.jwks.statistics()[server.uri]["last_error"])
    # without a token nothing is fetched and the request passes
    before = server.requests
    assert (await authn.authenticate([r], "GET", "/", [])).status == 200
    assert server.requests == before


async def test_nothing_listening_is_a_fetch_failure(nursery: trio.Nursery) -> None:
    server = JwksServer()
    await nursery.start(server.run)
    uri = server.uri.replace(str(server.port), "1")  # port 1 on loopback: refused
    result = await Authenticator().authenticate(
        [rule(jwks_uri=uri)], "GET", "/", _bearer(token(K1))
    )
    assert (result.status, result.body) == (401, "Jwks remote fetch is failed")


async def test_jwks_over_https(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki["server"], pki["server-key"])
    server = JwksServer(body=jwks([K1]), ssl_context=server_ctx)
    await nursery.start(server.run)
    assert server.uri.startswith("https://")
    client_ctx = ssl.create_default_context(cafile=pki["ca"])
    authn = Authenticator(ssl_context=client_ctx)
    result = await authn.authenticate([rule(jwks_uri=server.uri)], "GET", "/", _bearer(token(K1)))
    assert result.status == 200
    # the system trust store does not know the test CA: the fetch fails, nothing is trusted
    untrusting = Authenticator()
    result = await untrusting.authenticate(
        [rule(jwks_uri=server.uri)], "GET", "/", _bearer(token(K1))
    )
    assert (result.status, result.body) == (401, "Jwks remote fetch is failed")


async def test_a_connect_hook_reaches_a_jwks_uri_the_node_cannot_resolve(
    nursery: trio.Nursery,
) -> None:
    server = JwksServer(body=jwks([K1]))
    await nursery.start(server.run)
    dialled: list[tuple[str, int]] = []

    async def connect(host: str, port: int) -> trio.abc.Stream:
        dialled.append((host, port))  # e.g. a mesh Service, reached through the agent's pod
        return await trio.open_tcp_stream("127.0.0.1", server.port)

    authn = Authenticator(connect=connect)
    uri = "http://jwks.auth.svc.cluster.local:8080/keys"
    result = await authn.authenticate([rule(jwks_uri=uri)], "GET", "/", _bearer(token(K1)))
    assert result.status == 200
    assert dialled == [("jwks.auth.svc.cluster.local", 8080)]
    assert authn.statistics()[uri]["keys"] == 1


async def test_a_requester_leaving_mid_fetch_does_not_count_as_a_failed_fetch(
    nursery: trio.Nursery,
) -> None:
    server = JwksServer(body=jwks([K1]), hang=True)
    await nursery.start(server.run)
    authn = Authenticator()
    r = rule(jwks_uri=server.uri, timeout=30)
    with trio.move_on_after(0.3):  # the client goes away while the fetch hangs
        await authn.authenticate([r], "GET", "/", _bearer(token(K1)))
    assert authn.statistics()[server.uri]["failures"] == 0
    server.hang = False
    # at once (no 1 s retry pause): the next request fetches again and succeeds
    result = await authn.authenticate([r], "GET", "/", _bearer(token(K1)))
    assert result.status == 200
    assert server.requests == 2
