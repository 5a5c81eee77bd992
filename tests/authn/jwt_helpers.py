"""A test issuer: signing keys made with `cryptography`, their JWKS, tokens signed with them,
and a real JWKS server on loopback (plain HTTP, or HTTPS with a throwaway CA)."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nodeagent.snapshot.request_authn import JwtRule

ISSUER = "https://issuer.example.com"

_RSA: rsa.RSAPrivateKey | None = None


def _rsa_key() -> rsa.RSAPrivateKey:
    # RSA key generation costs ~0.1 s: one key serves every RSA kid of a test run
    global _RSA
    if _RSA is None:
        _RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA


_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algo = jwt.get_algorithm_by_name(self.alg)
        out: dict[str, Any] = json.loads(algo.to_jwk(public))
        out.update(kid=self.kid, use="sig")
        return out


def signing_key(kid: str, alg: str = "RS256") -> SigningKey:
    if alg.startswith(("RS", "PS")):
        return SigningKey(kid, alg, _rsa_key() if kid != "other-rsa" else _other_rsa())
    return SigningKey(kid, alg, ec.generate_private_key(_CURVES[alg]()))


_OTHER: rsa.RSAPrivateKey | None = None


def _other_rsa() -> rsa.RSAPrivateKey:
    global _OTHER
    if _OTHER is None:
        _OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _OTHER


def jwks(keys: Iterable[SigningKey]) -> str:
    return json.dumps({"keys": [k.jwk() for k in keys]})


def token(key: SigningKey, *, kid: str | None = "same", **claims: Any) -> str:
    """A token signed by `key`; claims default to a valid one of ISSUER for `user-1`."""
    now = int(time.time())
    payload: dict[str, Any] = {"iss": ISSUER, "sub": "user-1", "iat": now, "exp": now + 600}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": key.kid if kid == "same" else kid} if kid is not None else {}
    return jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)


def rule(**fields: Any) -> JwtRule:
    fields.setdefault("policy", "default/jwt")
    fields.setdefault("issuer", ISSUER)
    return JwtRule(**fields)


@dataclass
class JwksServer:
    """A real HTTP server on 127.0.0.1 serving `body` with `status` to every request."""

    body: str = '{"keys": []}'
    status: int = 200
    hang: bool = False  # accept and read, never answer
    requests: int = 0
    port: int = 0
    ssl_context: ssl.SSLContext | None = None

    @property
    def uri(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def _handle(self, stream: trio.abc.Stream) -> None:
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            self.requests += 1
            if self.hang:
                await trio.sleep_forever()
            body = self.body.encode()
            reason = "OK" if self.status == 200 else "Error"
            head = (
                f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


async def wait_until(predicate: Any, seconds: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail the test after `seconds`."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110 - a counter, not an event, says the work ran
            await trio.sleep(0.01)
