"""The JWKS cache: remote key sets fetched over HTTP(S), kept, refreshed; inline ones parsed once.

One entry per `jwksUri`. The first request that needs it fetches it, waiting at most the rule's
`timeout`; requests arriving meanwhile wait for that same fetch. A token whose `kid` no cached
key matches triggers one refetch, at most once per `min_refetch_interval` per URI. `run()`
refreshes every URI in use each `refresh_interval` (Istio's 20 minutes) and forgets URIs no rule
has used for two intervals. A failed fetch (connect, HTTP status, timeout, a body without a
usable key) keeps the last good keys and is logged; with no good keys yet, the request fails
with Envoy's `Jwks remote fetch is failed`.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from nodeagent.authn.keyset import MAX_JWKS, JwksError, parse_jwks
from nodeagent.authn.verify import Key
from nodeagent.httpclient import HttpClientError, HttpConnection
from nodeagent.log import get_logger

log = get_logger("authn.jwks")

# (host, port) → a connected stream; for URIs the node's own resolver and routes cannot reach
Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]
RETRY_WITHOUT_KEYS = 1.0  # seconds between fetch attempts while a URI has no good keys yet


class FetchError(Exception):
    """One JWKS fetch failed; the message names the URI and why."""


@dataclass(slots=True)
class _Entry:
    uri: str
    keys: tuple[Key, ...] | None = None
    fetched_at: float = float("-inf")  # last success (trio clock)
    attempted_at: float = float("-inf")  # last attempt, success or not
    used_at: float = 0.0
    in_flight: trio.Event | None = None
    fetches: int = 0
    failures: int = 0
    last_error: str | None = None


class JwksCache:
    def __init__(
        self,
        *,
        http_timeout: float = 5.0,
        refresh_interval: float = 1200.0,
        min_refetch_interval: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        connect: Connect | None = None,
    ) -> None:
        self._http_timeout = http_timeout
        self._refresh_interval = refresh_interval
        self._min_refetch = min_refetch_interval
        self._ssl = ssl_context
        self._connect = connect
        self._entries: dict[str, _Entry] = {}
        self._inline: dict[str, tuple[Key, ...] | JwksError] = {}

    # -- what the authenticator asks ---------------------------------------------------------

    def inline(self, jwks: str) -> tuple[Key, ...]:
        """The keys of an inline JWKS (parsed once per distinct text); JwksError if none."""
        found = self._inline.get(jwks)
        if found is None:
            try:
                found = parse_jwks(jwks)
            except JwksError as exc:
                found = exc
            if len(self._inline) >= 1024:
                self._inline.clear()
            self._inline[jwks] = found
        if isinstance(found, JwksError):
            raise found
        return found

    async def keys(self, uri: str, max_wait: float) -> tuple[Key, ...] | None:
        """The cached keys of `uri`, fetching them first if there are none yet (waiting at most
        `max_wait` seconds); None when no good keys could be had."""
        entry = self._entry(uri)
        if entry.keys is None and trio.current_time() - entry.attempted_at >= RETRY_WITHOUT_KEYS:
            await self._fetch_bounded(entry, max_wait)
        elif entry.keys is None and entry.in_flight is not None:
            await self._wait(entry, max_wait)
        return entry.keys

    async def refetch_for_unknown_kid(self, uri: str, max_wait: float) -> tuple[Key, ...] | None:
        """After a token named a key the cache does not hold: refetch, unless this URI was
        fetched less than `min_refetch_interval` ago; the keys afterwards (old ones if the
        fetch failed)."""
        entry = self._entry(uri)
        if trio.current_time() - entry.attempted_at >= self._min_refetch:
            await self._fetch_bounded(entry, max_wait)
        elif entry.in_flight is not None:
            await self._wait(entry, max_wait)
        return entry.keys

    def statistics(self) -> dict[str, dict[str, object]]:
        return {
            e.uri: {
                "keys": len(e.keys or ()),
                "fetches": e.fetches,
                "failures": e.failures,
                "last_error": e.last_error,
            }
            for e in self._entries.values()
        }

    # -- background refresh ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        tick = max(0.05, min(self._refresh_interval / 4, 30.0))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for uri, entry in list(self._entries.items()):
                if now - entry.used_at > 2 * self._refresh_interval and entry.in_flight is None:
                    del self._entries[uri]
            due = [
                e
                for e in self._entries.values()
                if e.in_flight is None and now - e.attempted_at >= self._refresh_interval
            ]
            async with trio.open_nursery() as nursery:
                for entry in due:
                    nursery.start_soon(self._fetch_bounded, entry, self._http_timeout)

    # -- fetching ----------------------------------------------------------------------------

    def _entry(self, uri: str) -> _Entry:
        entry = self._entries.get(uri)
        if entry is None:
            entry = self._entries[uri] = _Entry(uri)
        entry.used_at = trio.current_time()
        return entry

    async def _wait(self, entry: _Entry, max_wait: float) -> None:
        event = entry.in_flight
        if event is not None:
            with trio.move_on_after(max_wait):
                await event.wait()

    async def _fetch_bounded(self, entry: _Entry, max_wait: float) -> None:
        """Fetch `entry` (or join the fetch under way), for at most `max_wait` seconds."""
        if entry.in_flight is not None:
            await self._wait(entry, max_wait)
            return
        entry.in_flight = event = trio.Event()
        attempted, entry.attempted_at = entry.attempted_at, trio.current_time()
        entry.fetches += 1
        finished = False
        try:
            with trio.fail_after(max_wait):
                keys = await self._fetch(entry.uri)
        except (FetchError, trio.TooSlowError) as exc:
            finished = True
            entry.failures += 1
            why = str(exc) if isinstance(exc, FetchError) else f"no answer within {max_wait:g}s"
            entry.last_error = why
            log.warning(
                "jwks.fetch.failed",
                uri=entry.uri,
                error=why,
                keeping=len(entry.keys or ()),
            )
        else:
            finished = True
            kids = sorted(k.kid or "" for k in keys)
            log.info("jwks.fetch.complete", uri=entry.uri, keys=len(keys), kids=kids)
            entry.keys, entry.fetched_at, entry.last_error = keys, trio.current_time(), None
        finally:
            if not finished:  # cancelled (the requester left): not an attempt that failed
                entry.attempted_at = attempted
            entry.in_flight = None
            event.set()

    async def _fetch(self, uri: str) -> tuple[Key, ...]:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"{uri}: not an http:// or https:// URL")
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise FetchError(f"{uri}: bad port") from None
        host = parts.hostname
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        context = (self._ssl or ssl.create_default_context()) if tls else None
        connector = None
        if self._connect is not None:
            connect = self._connect

            async def connector() -> trio.abc.Stream:
                return await connect(host, port)

        try:
            conn = await HttpConnection.open(
                host,
                port,
                host_header=parts.netloc.rpartition("@")[2],
                ssl_context=context,
                connector=connector,
                peer=uri,
            )
            try:
                await conn.send("GET", target, [("Accept", "application/json")])
                status = await conn.read_head()
                body = await conn.read_body(MAX_JWKS)
            finally:
                await conn.aclose()
        except HttpClientError as exc:
            raise FetchError(f"{uri}: {exc}") from None
        if status != 200:
            raise FetchError(f"{uri}: HTTP {status}")
        try:
            return parse_jwks(body)
        except JwksError as exc:
            raise FetchError(f"{uri}: {exc}") from None
