"""What authentication tells the rest of the data path: the request's identity and header edits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class RequestAuth:
    """What authorization and telemetry see of the end user (`request.auth.*` in Istio).

    `principal` is `<iss>/<sub>` of the verified token, `audiences` its `aud`, `presenter` its
    `azp`, `claims` its whole payload (read-only). `empty()`: no token was presented."""

    principal: str | None = None
    audiences: tuple[str, ...] = ()
    presenter: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def empty(cls) -> RequestAuth:
        return _NO_TOKEN


_NO_TOKEN = RequestAuth()


@dataclass(frozen=True)
class AuthnResult:
    auth: RequestAuth | None  # None => rejected
    status: int  # 200 when accepted, 401 when rejected (403 for a wrong audience, as Envoy)
    body: str  # Istio/Envoy's message when rejected
    remove_headers: tuple[str, ...] = ()  # token headers to strip (lowercase names)
    add_headers: tuple[tuple[str, str], ...] = ()  # outputPayloadToHeader / outputClaimToHeaders
    strip_params: tuple[str, ...] = ()  # query params to remove from the path

    @property
    def accepted(self) -> bool:
        return self.auth is not None

    @classmethod
    def reject(cls, status: int, body: str) -> AuthnResult:
        return cls(None, status, body)


PASS = AuthnResult(RequestAuth.empty(), 200, "")
