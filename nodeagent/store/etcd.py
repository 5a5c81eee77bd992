"""The etcd v3 store backend (`etcd://h1:2379,h2:2379`), through etcd's HTTP/JSON gateway.

No gRPC: every call is a POST under `/v3/` (keys and values base64, int64s as strings), sent
with h11 over trio streams (`etcd_http`), over TLS with client certificates when the URL says
`cacert=`/`cert=`/`key=`, with an auth token when it says `user=`/`password=` (fetched from
`/v3/auth/authenticate`, fetched again when the server calls it invalid).

Failover: requests go to the current endpoint; on a connection error, a timeout or a server
error that means "no leader right now", the client moves to the next endpoint and tries again,
a bounded number of times, with backoff. A request that never reached a server is always retried.
A read, a lease call or a watch is retried also when the connection failed after sending it;
a write (put, delete, txn) then is not, since the server may have applied it and a second copy
would be a second revision: the caller gets StoreUnavailable ("outcome unknown") and decides.

Watches stream from one member; when the stream breaks, the watch reconnects (next endpoint)
from the last delivered revision + 1, so no event is lost or repeated. A start revision that is
compacted raises CompactedError (on entry or on the first iteration).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import trio

from nodeagent.log import get_logger
from nodeagent.store import checks
from nodeagent.store.base import (
    CompactedError,
    Compare,
    Event,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
    TxnResult,
)
from nodeagent.store.etcd_http import (
    MAX_MESSAGE,
    HttpConnection,
    JsonLines,
    Lost,
    NotSent,
    ProtocolError,
)
from nodeagent.store.url import StoreURL, format_endpoint

log = get_logger("store.etcd")

MAX_ATTEMPTS = 12
RETRY_BUDGET = 2  # a request gives up after this many timeouts' worth of retrying
MAX_BACKOFF = 1.0
MAX_IDLE = 8
RANGE_PAGE = 1000

# server errors that mean the request was not applied: retry anywhere
_NOT_APPLIED = (
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: too many requests",
    "etcdserver: unhealthy cluster",
    "etcdserver: server stopped",
    "raft: stopped",
)
# server errors after which a write may or may not have been applied
_MAYBE_APPLIED = (
    "etcdserver: leader changed",
    "etcdserver: request timed out",
    "etcdserver: request cancelled",
    "etcdserver: stopped",
)
_AUTH_EXPIRED = ("etcdserver: invalid auth token", "etcdserver: user name is empty")
_LEASE_NOT_FOUND = "etcdserver: requested lease not found"
_COMPACTED = "etcdserver: mvcc: required revision has been compacted"


class _Retry(Exception):
    def __init__(self, message: str, *, applied_maybe: bool) -> None:
        super().__init__(message)
        self.applied_maybe = applied_maybe


class _AuthExpired(Exception):
    pass


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _b64_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


def range_end(prefix: str) -> bytes:
    """etcd's range_end for a prefix: the prefix with its last byte < 0xff incremented."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


def _prefix_fields(prefix: str) -> dict[str, str]:
    return {
        "key": _b64(prefix) if prefix else _b64("\0"),
        "range_end": _b64_bytes(range_end(prefix)),
    }


class _Parse:
    """Defensive readers for gateway JSON; every failure names the endpoint and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, why: str) -> StoreError:
        return StoreError(f"{self.where}: malformed response: {why}")

    def obj(self, parent: dict[str, Any], name: str) -> dict[str, Any]:
        value = parent.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(f"{name} is not an object")
        return value

    def integer(self, parent: dict[str, Any], name: str) -> int:
        value = parent.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.fail(f"{name}={value!r} is not an integer")
        try:
            return int(value)
        except ValueError:
            raise self.fail(f"{name}={value!r} is not an integer") from None

    def boolean(self, parent: dict[str, Any], name: str) -> bool:
        value = parent.get(name, False)
        if not isinstance(value, bool):
            raise self.fail(f"{name}={value!r} is not a boolean")
        return value

    def blob(self, parent: dict[str, Any], name: str) -> bytes:
        value = parent.get(name, "")
        if not isinstance(value, str):
            raise self.fail(f"{name} is not a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"{name} is not valid base64") from None

    def objects(self, parent: dict[str, Any], name: str) -> list[dict[str, Any]]:
        value = parent.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(f"{name} is not a list of objects")
        return value

    def kv(self, raw: dict[str, Any]) -> KeyValue:
        try:
            key = self.blob(raw, "key").decode()
        except UnicodeDecodeError:
            raise self.fail("a key is not UTF-8") from None
        return KeyValue(
            key=key,
            value=self.blob(raw, "value"),
            create_revision=self.integer(raw, "create_revision"),
            mod_revision=self.integer(raw, "mod_revision"),
            version=self.integer(raw, "version"),
            lease=self.integer(raw, "lease"),
        )

    def revision(self, resp: dict[str, Any]) -> int:
        rev = self.integer(self.obj(resp, "header"), "revision")
        if rev <= 0:
            raise self.fail("header.revision is missing")
        return rev

    def event(self, raw: dict[str, Any]) -> Event:
        kind = raw.get("type", "PUT")
        kv = self.kv(self.obj(raw, "kv"))
        if kind == "PUT":
            return Event("put", kv)
        if kind == "DELETE":
            return Event("delete", checks.deleted(kv.key, kv.mod_revision))
        raise self.fail(f"event type {kind!r}")


def _error_message(body: dict[str, Any]) -> str:
    for field in ("message", "error"):
        value = body.get(field)
        if isinstance(value, str) and value:
            return value[:500]
        if isinstance(value, dict):
            return _error_message(value)
    return json.dumps(body)[:500]


def _ssl_context(url: StoreURL) -> ssl.SSLContext | None:
    opts = url.options
    if not {"cacert", "cert", "key"} & opts.keys():
        return None
    try:
        ctx = ssl.create_default_context(cafile=opts.get("cacert"))
        if "cert" in opts:
            ctx.load_cert_chain(opts["cert"], opts["key"])
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"{url.redacted}: TLS files: {exc}") from None
    return ctx


class EtcdStore(Store):
    """A `Store` on an etcd v3 cluster, with failover across its endpoints."""

    def __init__(self, url: StoreURL) -> None:
        self.url = url.redacted
        self._endpoints = list(url.endpoints)
        self._names = [format_endpoint(h, p) for h, p in self._endpoints]
        self._ssl = _ssl_context(url)
        self._scheme = "https" if self._ssl else "http"
        self._timeout = url.number("timeout", 5.0, minimum=0.1)
        self._user = url.options.get("user")
        self._password = url.options.get("password", "")
        self._token: str | None = None
        self._current = 0
        self._idle: list[list[HttpConnection]] = [[] for _ in self._endpoints]
        self._closed = False

    @classmethod
    async def open(cls, url: StoreURL) -> EtcdStore:
        await trio.lowlevel.checkpoint()
        return cls(url)

    def _where(self, ep: int) -> str:
        return f"etcd {self._scheme}://{self._names[ep]}"

    # -- one request on one endpoint ----------------------------------------------------------

    async def _connection(self, ep: int) -> HttpConnection:
        idle = self._idle[ep]
        while idle:
            conn = idle.pop()
            if not conn.stale():
                return conn
            await conn.aclose()
        host, port = self._endpoints[ep]
        return await HttpConnection.connect(host, port, self._names[ep], self._ssl)

    def _release(self, ep: int, conn: HttpConnection) -> bool:
        if not self._closed and conn.reusable() and len(self._idle[ep]) < MAX_IDLE:
            self._idle[ep].append(conn)
            return True
        return False

    def _headers(self) -> list[tuple[str, str]]:
        return [("Authorization", self._token)] if self._token else []

    async def _once(self, ep: int, path: str, body: bytes) -> dict[str, Any]:
        """One POST on endpoint `ep`; raises _Retry, _AuthExpired or a final StoreError."""
        where = self._where(ep)
        conn: HttpConnection | None = None
        sent = False
        try:
            with trio.fail_after(self._timeout):
                conn = await self._connection(ep)
                await conn.send_request(path, body, self._headers())
                sent = True
                status = await conn.read_head()
                raw = await conn.read_body()
        except NotSent as exc:
            raise _Retry(f"{where}{path}: {exc}", applied_maybe=False) from None
        except Lost as exc:
            raise _Retry(f"{where}{path}: {exc}", applied_maybe=True) from None
        except trio.TooSlowError:
            raise _Retry(
                f"{where}{path}: no answer within {self._timeout}s", applied_maybe=sent
            ) from None
        except ProtocolError as exc:
            raise StoreError(f"{where}{path}: {exc}") from None
        finally:
            if conn is not None and not self._release(ep, conn):
                await conn.aclose()
        return self._check(where + path, status, raw)

    def _check(self, where: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            body = self._first_message(raw)
        except ProtocolError as exc:
            raise StoreError(f"{where}: HTTP {status}: {exc}") from None
        if status == 200 and "error" not in body:
            return body
        message = _error_message(body)
        self._raise_for(where, status, message)
        raise AssertionError("unreachable")

    @staticmethod
    def _first_message(raw: bytes) -> dict[str, Any]:
        """A unary body, or the first message of a streamed one (lease keepalive)."""
        lines = JsonLines()
        lines.receive_data(raw)
        first = lines.next_event() or lines.finish()
        if first is None:
            raise ProtocolError("empty response")
        result = first.get("result")
        return result if isinstance(result, dict) and "error" not in first else first

    def _raise_for(self, where: str, status: int, message: str) -> None:
        if any(m in message for m in _AUTH_EXPIRED) and self._user:
            raise _AuthExpired(message)
        if _LEASE_NOT_FOUND in message:
            raise LeaseNotFound(f"{where}: {message}")
        if any(m in message for m in _NOT_APPLIED):
            raise _Retry(f"{where}: {message}", applied_maybe=False)
        if any(m in message for m in _MAYBE_APPLIED) or status in (502, 503, 504):
            raise _Retry(f"{where}: {message}", applied_maybe=True)
        raise StoreError(f"{where}: HTTP {status}: {message}")

    # -- failover -----------------------------------------------------------------------------

    async def _call(
        self, path: str, request: dict[str, Any], *, idempotent: bool
    ) -> dict[str, Any]:
        if self._closed:
            raise StoreError(f"{self.url}: {path} on a closed store")
        body = json.dumps(request).encode()
        last = "no attempt"
        auth_retried = False
        give_up = trio.current_time() + RETRY_BUDGET * self._timeout
        for attempt in range(MAX_ATTEMPTS):
            if attempt and trio.current_time() >= give_up:
                break
            ep = self._current
            try:
                if self._user and self._token is None:
                    await self._authenticate(ep)
                return await self._once(ep, path, body)
            except _AuthExpired as exc:
                self._token = None
                log.info("auth.expired", store=self.url, endpoint=self._names[ep], error=str(exc))
                if auth_retried:
                    raise StoreError(f"{self._where(ep)}{path}: auth: {exc}") from None
                auth_retried = True
                continue
            except _Retry as exc:
                last = str(exc)
                self._failover(ep, last)
                if exc.applied_maybe and not idempotent:
                    raise StoreUnavailable(f"{last}; the write's outcome is unknown") from None
            # the first round over the members goes fast; then back off
            if attempt + 1 >= len(self._endpoints):
                await trio.sleep(min(MAX_BACKOFF, 0.05 * 2 ** (attempt + 1 - len(self._endpoints))))
        raise StoreUnavailable(f"{self.url}: {path}: no endpoint answered; last: {last}")

    def _failover(self, ep: int, why: str) -> None:
        if self._current == ep:
            self._current = (ep + 1) % len(self._endpoints)
            log.info(
                "endpoint.failover",
                store=self.url,
                failed=self._names[ep],
                next=self._names[self._current],
                error=why,
            )

    async def _authenticate(self, ep: int) -> None:
        body = json.dumps({"name": self._user, "password": self._password}).encode()
        try:
            resp = await self._once(ep, "/v3/auth/authenticate", body)
        except _AuthExpired as exc:
            raise StoreError(f"{self._where(ep)}: authenticate as {self._user!r}: {exc}") from None
        token = resp.get("token")
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise StoreError(f"{self._where(ep)}: authenticate: malformed token in the response")
        self._token = token

    # -- the Store interface ----------------------------------------------------------------

    def _parse(self) -> _Parse:
        return _Parse(f"{self._where(self._current)}")

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call("/v3/kv/range", {"key": _b64(key)}, idempotent=True)
        p = self._parse()
        kvs = p.objects(resp, "kvs")
        return p.kv(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        for _ in range(3):
            try:
                return await self._range(prefix)
            except StoreError as exc:
                # a compaction overtook the pinned revision between two pages: start over
                if _COMPACTED not in str(exc):
                    raise
        return await self._range(prefix)

    async def _range(self, prefix: str) -> tuple[list[KeyValue], int]:
        fields = _prefix_fields(prefix)
        out: list[KeyValue] = []
        revision = 0
        while True:
            req: dict[str, Any] = {**fields, "limit": RANGE_PAGE}
            if revision:
                req["revision"] = revision  # every page from the same snapshot
            resp = await self._call("/v3/kv/range", req, idempotent=True)
            p = self._parse()
            revision = revision or p.revision(resp)
            page = [p.kv(raw) for raw in p.objects(resp, "kvs")]
            out.extend(page)
            if not p.boolean(resp, "more") or not page:
                return out, revision
            fields = {**fields, "key": _b64(page[-1].key + "\0")}

    def _op(self, op: Op) -> dict[str, Any]:
        if isinstance(op, Put):
            put: dict[str, Any] = {"key": _b64(op.key), "value": _b64_bytes(op.value)}
            if op.lease:
                put["lease"] = str(op.lease)
            return {"request_put": put}
        fields = _prefix_fields(op.key) if op.prefix else {"key": _b64(op.key)}
        return {"request_delete_range": fields}

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        checks.check_key(self.url, key)
        checks.check_value(self.url, key, value)
        req: dict[str, Any] = {"key": _b64(key), "value": _b64_bytes(value)}
        if lease:
            req["lease"] = str(lease)
        resp = await self._call("/v3/kv/put", req, idempotent=False)
        return self._parse().revision(resp)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        if not prefix:
            checks.check_key(self.url, key)
        req = _prefix_fields(key) if prefix else {"key": _b64(key)}
        resp = await self._call("/v3/kv/deleterange", req, idempotent=False)
        return self._parse().integer(resp, "deleted")

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        checks.check_ops(self.url, success)
        checks.check_ops(self.url, failure)
        req = {
            "compare": [
                {
                    "key": _b64(c.key),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": str(c.mod_revision),
                }
                for c in compares
            ],
            "success": [self._op(op) for op in success],
            "failure": [self._op(op) for op in failure],
        }
        resp = await self._call("/v3/kv/txn", req, idempotent=False)
        p = self._parse()
        return TxnResult(succeeded=p.boolean(resp, "succeeded"), revision=p.revision(resp))

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`; a later watch from before it raises CompactedError."""
        await self._call(
            "/v3/kv/compaction", {"revision": str(revision), "physical": True}, idempotent=True
        )

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise StoreError(f"{self.url}: lease ttl must be positive, got {ttl}")
        # etcd counts whole seconds (and raises tiny TTLs to its minimum)
        resp = await self._call(
            "/v3/lease/grant", {"TTL": str(math.ceil(ttl)), "ID": "0"}, idempotent=True
        )
        p = self._parse()
        if isinstance(resp.get("error"), str) and resp["error"]:
            raise StoreError(f"{p.where}: lease grant: {resp['error']}")
        lease = p.integer(resp, "ID")
        if lease == 0:
            raise p.fail("lease grant returned no ID")
        return lease

    async def keep_alive(self, lease: int) -> float:
        resp = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)
        ttl = self._parse().integer(resp, "TTL")
        if ttl <= 0:
            raise LeaseNotFound(f"{self.url}: lease {lease:#x} not found (expired or revoked)")
        return float(ttl)

    async def revoke_lease(self, lease: int) -> None:
        with suppress(LeaseNotFound):
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True)

    async def status(self, endpoint: int) -> dict[str, Any]:
        """`/v3/maintenance/status` of one member (no failover): member_id, leader, …"""
        body = json.dumps({}).encode()
        try:
            return await self._once(endpoint, "/v3/maintenance/status", body)
        except _Retry as exc:
            raise StoreUnavailable(str(exc)) from None

    # -- watch --------------------------------------------------------------------------------

    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[Event]]]:
        return self._watch(prefix, start_revision)

    @asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[AsyncIterator[Sequence[Event]]]:
        if self._closed:
            raise StoreError(f"{self.url}: watch on a closed store")
        events = self._events(prefix, start_revision)
        try:
            yield events
        finally:
            await events.aclose()

    async def _events(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[Sequence[Event], None]:
        cursor = max(start_revision, 0)  # 0: from "now", fixed by the created response
        failures = 0
        last = ""
        while True:
            if self._closed:
                raise StoreError(f"{self.url}: watch on {prefix!r} ended: store closed")
            ep = self._current
            where = f"{self._where(ep)}/v3/watch"
            conn: HttpConnection | None = None
            try:
                if self._user and self._token is None:
                    await self._authenticate(ep)
                with trio.fail_after(self._timeout):
                    conn = await self._connection(ep)
                    req = {
                        "create_request": {**_prefix_fields(prefix), "start_revision": str(cursor)}
                    }
                    await conn.send_request("/v3/watch", json.dumps(req).encode(), self._headers())
                    status = await conn.read_head()
                if status != 200:
                    with trio.fail_after(self._timeout):
                        raw = await conn.read_body()
                    self._check(where, status, raw)
                lines = JsonLines(MAX_MESSAGE)
                parse = _Parse(where)
                while True:
                    msg = lines.next_event()
                    if msg is None:
                        chunk = await conn.read_chunk()  # no timeout: a quiet watch is fine
                        if chunk is None:
                            msg = lines.finish()
                            if msg is None:
                                raise Lost("the watch stream ended")
                        else:
                            lines.receive_data(chunk)
                            continue
                    batch, cursor = self._watch_message(parse, msg, cursor)
                    failures = 0
                    if batch:
                        yield batch
            except (NotSent, Lost, trio.TooSlowError) as exc:
                last = f"{where}: {exc or 'timeout'}"
            except _Retry as exc:
                last = str(exc)
            except _AuthExpired:
                self._token = None
                last = f"{where}: auth token expired"
            except ProtocolError as exc:
                raise StoreError(f"{where}: {exc}") from None
            finally:
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
            failures += 1
            if failures > MAX_ATTEMPTS:
                raise StoreUnavailable(f"{self.url}: watch on {prefix!r}: {last}")
            log.info("watch.reconnect", store=self.url, prefix=prefix, revision=cursor, error=last)
            self._failover(ep, last)
            if failures >= len(self._endpoints):
                await trio.sleep(min(MAX_BACKOFF, 0.05 * 2 ** (failures - len(self._endpoints))))

    def _watch_message(
        self, p: _Parse, msg: dict[str, Any], cursor: int
    ) -> tuple[list[Event], int]:
        if "error" in msg:
            message = _error_message(msg)
            self._raise_for(p.where, 200, message)
        result = p.obj(msg, "result")
        compact = p.integer(result, "compact_revision")
        if compact > 0:
            raise CompactedError(cursor, compact)
        if p.boolean(result, "canceled"):
            reason = result.get("cancel_reason", "")
            if isinstance(reason, str) and _COMPACTED in reason:
                raise CompactedError(cursor, 0)
            raise StoreError(f"{p.where}: watch canceled by the server: {reason!r}")
        if cursor == 0 and p.boolean(result, "created"):
            cursor = p.revision(result) + 1
        events = [p.event(raw) for raw in p.objects(result, "events")]
        # a resumed stream never repeats, but be strict: drop anything already delivered
        events = [e for e in events if e.kv.mod_revision >= cursor]
        if events:
            cursor = events[-1].kv.mod_revision + 1
        return events, cursor

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle:
            while idle:
                await idle.pop().aclose()
