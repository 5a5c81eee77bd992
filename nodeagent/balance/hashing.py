"""Consistent hashing: the hash key of a request, a ketama ring and a Maglev table.

Hashes are stable across processes and machines (blake2b, not Python's salted `hash`), so every
node agent sends one key to the same endpoint. Tables are built over all of a cluster's
endpoints, ordered by address; an unavailable (ejected) endpoint is skipped at pick time by
walking on, so ejections and readmissions move only that endpoint's keys.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl

from nodeagent.balance.policy import ConsistentHash
from nodeagent.balance.state import EndpointState, PickContext

MAX_RING = 8_388_608  # Envoy's maximum_ring_size default
_MASK = (1 << 64) - 1


def hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "little")


def _mix(h: int) -> int:
    """A cheap 64-bit finalizer (splitmix64) for re-probing a Maglev table."""
    h = (h + 0x9E3779B97F4A7C15) & _MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def parse_cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def key_function(policy: ConsistentHash) -> Callable[[PickContext], str | None]:
    """The function extracting the hash key from a pick context (None: hash on nothing)."""
    name = policy.name
    if policy.source == "header":

        def header(ctx: PickContext) -> str | None:
            return ctx.headers.get(name) if ctx.headers is not None else None

        return header
    if policy.source == "cookie":

        def cookie(ctx: PickContext) -> str | None:
            if ctx.cookies is not None:
                return ctx.cookies.get(name)
            raw = ctx.headers.get("cookie") if ctx.headers is not None else None
            return parse_cookies(raw).get(name) if raw else None

        return cookie
    if policy.source == "query":

        def query(ctx: PickContext) -> str | None:
            if ctx.query is not None:
                return ctx.query.get(name)
            if ctx.path is None or "?" not in ctx.path:
                return None
            for k, v in parse_qsl(ctx.path.split("?", 1)[1], keep_blank_values=True):
                if k == name:
                    return v
            return None

        return query

    def source_ip(ctx: PickContext) -> str | None:
        return ctx.source_ip

    return source_ip


class HashTable:
    """Common interface of the ring and the Maglev table."""

    def lookup(self, h: int) -> EndpointState | None:
        raise NotImplementedError


class Ring(HashTable):
    """A ketama ring (Envoy's ring hash): points per endpoint hashed from `addr:port_i`."""

    def __init__(self, states: Sequence[EndpointState], ring_size: int) -> None:
        ordered = sorted(states, key=lambda s: s.key)
        points: list[tuple[int, int]] = []
        if ordered:
            # Envoy uses ceil(ring_size / n) points per endpoint, so every endpoint's points
            # change when one is added and keys also move between the old ones. Rounding up to
            # a power of two keeps the points (and the keys) of the others in place unless n
            # crosses a power-of-two boundary; the ring stays at least `ring_size` large.
            wanted = max(1, -(-ring_size // len(ordered)))
            per_host = min(1 << (wanted - 1).bit_length(), max(1, MAX_RING // len(ordered)))
            for idx, s in enumerate(ordered):
                for i in range(per_host):
                    points.append((hash64(f"{s.key}_{i}"), idx))
        points.sort()
        self._hashes = [p[0] for p in points]
        self._owners = [ordered[p[1]] for p in points]

    def __len__(self) -> int:
        return len(self._hashes)

    def lookup(self, h: int) -> EndpointState | None:
        n = len(self._hashes)
        if n == 0:
            return None
        i = bisect.bisect_left(self._hashes, h)
        owners = self._owners
        for step in range(n):
            s = owners[(i + step) % n]
            if s.available:
                return s
        return None


class Maglev(HashTable):
    """Google's Maglev table (as Envoy builds it): each endpoint fills slots in the order of its
    own permutation, round robin, until the prime-sized table is full."""

    def __init__(self, states: Sequence[EndpointState], table_size: int) -> None:
        ordered = sorted(states, key=lambda s: s.key)
        m = table_size
        self._size = m
        self._table: list[EndpointState] = []
        if not ordered:
            return
        offsets = [hash64(s.key) % m for s in ordered]
        skips = [hash64(s.key + "#skip") % (m - 1) + 1 for s in ordered]
        nexts = [0] * len(ordered)
        table: list[int] = [-1] * m
        filled = 0
        while True:
            for i in range(len(ordered)):
                off, skip, j = offsets[i], skips[i], nexts[i]
                c = (off + j * skip) % m
                while table[c] >= 0:
                    j += 1
                    c = (off + j * skip) % m
                table[c] = i
                nexts[i] = j + 1
                filled += 1
                if filled == m:
                    self._table = [ordered[t] for t in table]
                    return

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, h: int) -> EndpointState | None:
        table = self._table
        if not table:
            return None
        s = table[h % self._size]
        if s.available:
            return s
        # An unavailable endpoint's keys spread over the others by re-probing; each probe lands
        # on an endpoint with its share of the table. Bounded: the caller falls back.
        for _ in range(64):
            h = _mix(h)
            s = table[h % self._size]
            if s.available:
                return s
        return None
