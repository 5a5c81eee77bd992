"""The console's access check when it listens beyond loopback: a bearer token from a file.

A client sends `Authorization: Bearer <token>` (curl, scripts) or the `console_token` cookie,
which a browser gets by opening any page once with `?token=<token>` (the console answers with a
redirect that sets it HttpOnly, SameSite=Strict, and drops the token from the address bar).
Tokens are compared in constant time. Without a token file the console only listens on
loopback (`cli` refuses otherwise). Pure: works on `HttpServerRequest`s.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from nodeagent.httpserver import HttpServerRequest, Response, Route

COOKIE = "console_token"
MIN_TOKEN = 16


class TokenError(ValueError):
    pass


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise TokenError(f"--token-file {path}: {exc.strerror or exc}") from None
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise TokenError(
            f"--token-file {path}: the token must be one word of at least {MIN_TOKEN} characters"
        )
    return token


def _cookie(request: HttpServerRequest) -> str | None:
    raw = request.headers.get("cookie")
    if not raw:
        return None
    try:
        jar = SimpleCookie(raw)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


def presented(request: HttpServerRequest) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return _cookie(request)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def guard(route: Route, token: str) -> Route:
    """`route`, answering only requests that carry `token` (401 otherwise)."""

    def handler(request: HttpServerRequest) -> Response:
        given = request.param("token")
        if given is not None:
            if not _same(given, token):
                return Response.json({"error": "wrong token"}, 401)
            rest = {k: v[-1] for k, v in request.query.items() if k != "token"}
            location = request.path + (f"?{urlencode(rest)}" if rest else "")
            cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            return Response(
                303, b"", "text/plain", (("location", location), ("set-cookie", cookie))
            )
        found = presented(request)
        if found is None or not _same(found, token):
            return Response.json(
                {"error": "this console needs its token: open it with ?token=… or send "
                          "Authorization: Bearer …"},
                401,
            )  # fmt: skip
        return route.handler(request)

    return Route(handler, route.methods)


def guard_all(routes: Mapping[str, Route], token: str | None) -> dict[str, Route]:
    if token is None:
        return dict(routes)
    return {path: guard(route, token) for path, route in routes.items()}
